"""What the test areas share (no tests here):

- common: the repository root, fresh seeds, dtypes, the (backend, device) pairs that run here,
  and the relative-error comparison with its tolerance table;
- lora_inputs: lora_linear's inputs, PyTorch baselines and float64 truth;
- dp_models: small models and the torch.func ground truth of a private step;
- hf_models: tiny transformers models and PEFT adapters;
- bench_runs: the benchmark scripts in their CPU smoke mode;
- flower_fakes: a server identity and a Grid for driving Flower strategies without a run;
- interpreter_checks: the hint and int32 checks on interpreted Triton kernels;
- triton_probes: small Triton kernels that probe Philox and the checks;
- cuda_emu: csrc/'s kernels on the CPU, over the emulated runtime in native/.
"""
