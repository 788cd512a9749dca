"""One LLM inference energy experiment: HF transformers greedy generation, timed, with NVML energy.

Run by llem-dispatch's container helper (`function: experiment:run`) with one config:

    {"model": "llama-1b", "batch_size": 8, "dtype": "bf16",
     "prompt_tokens": 256, "max_new_tokens": 128, "repeats": 2, "gpus": 1}

The model is a decoder-only Llama built from a config with random weights: nothing
is downloaded, and the compute and energy per token do not depend on the weight
values. Greedy decoding of exactly `max_new_tokens` tokens for a batch of random
prompts of `prompt_tokens` tokens; one warm-up generation is not measured. With
`gpus` > 1 the model is split across the visible GPUs by a `device_map` (layers in
contiguous blocks, the way `device_map="auto"` places them), through accelerate.

Measured, per experiment: prefill time (a generation of one token), decode time
(full generation minus prefill), output tokens per second, NVML energy over the
measured window for each GPU the experiment sees (total-energy-counter deltas, keyed
by GPU UUID; no other GPU is read), joules per output token, peak GPU memory, and
the GPUs' names and UUIDs. On a machine without CUDA it runs on the CPU (energy
and GPU memory are then None), which is what the CI test does with a tiny model.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

# Llama-architecture sizes. 0.1b is a GPT-2-small-sized Llama (Llama-2 vocabulary);
# 1b and 8b follow Llama-3.2-1B and Llama-3-8B. `tiny` is for tests on a CPU.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "llama-0.1b": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 32000,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
}

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def split_device_map(
    num_layers: int, devices: list[Any], *, tied_embeddings: bool = False
) -> dict[str, Any]:
    """A `device_map` for a Llama across `devices`: contiguous blocks of decoder layers.

    The embedding (and the rotary table) go with the first block, the final norm and
    the LM head with the last; a head tied to the embedding stays with it.
    """
    if not devices:
        raise ValueError("split_device_map needs at least one device")
    per_device = -(-num_layers // len(devices))
    device_map: dict[str, Any] = {
        "model.embed_tokens": devices[0],
        "model.rotary_emb": devices[0],
    }
    for layer in range(num_layers):
        device_map[f"model.layers.{layer}"] = devices[min(layer // per_device, len(devices) - 1)]
    device_map["model.norm"] = devices[-1]
    device_map["lm_head"] = devices[0] if tied_embeddings else devices[-1]
    return device_map


def build_model(config: dict[str, Any], devices: list[Any]) -> Any:
    """A random-weight LlamaForCausalLM in the config's dtype, placed on `devices`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = {**SIZES[str(config.get("model", "llama-0.1b"))], **config.get("arch", {})}
    arch.setdefault("max_position_embeddings", 4096)
    model_config = LlamaConfig(**arch)
    dtype = getattr(torch, DTYPES[str(config.get("dtype", "bf16"))])
    torch.manual_seed(int(config.get("seed", 0)))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Built on the first device directly: random init on a GPU takes a second
        # where an 8B model on the CPU would take minutes.
        with torch.device(devices[0]):
            model = LlamaForCausalLM(model_config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if len(set(map(str, devices))) > 1:
        from accelerate import dispatch_model

        device_map = split_device_map(
            model_config.num_hidden_layers,
            devices,
            tied_embeddings=bool(model_config.tie_word_embeddings),
        )
        model = dispatch_model(model, device_map=device_map)
        # What from_pretrained(device_map=...) leaves on the model; generate reads it.
        model.hf_device_map = device_map
        # The first GPU held the whole model while it was built; give back what moved.
        torch.cuda.empty_cache()
    return model


def _nvml_energy_reader(uuids: list[str]) -> Callable[[], dict[str, float]] | None:
    """A function returning each GPU's total-energy counter (mJ), or None without NVML."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handles = {u: pynvml.nvmlDeviceGetHandleByUUID(u) for u in uuids}
        for handle in handles.values():
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # noqa: BLE001 - no NVML (CPU, old GPU): energy is recorded as None
        return None
    return lambda: {
        u: float(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for u, h in handles.items()
    }


def _assigned_uuids() -> list[str] | None:
    """NVML's UUIDs of the host GPU ids the dispatcher assigned (LLEM_GPU_IDS)."""
    ids = [i for i in os.environ.get("LLEM_GPU_IDS", "").split(",") if i.strip()]
    if not ids:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        # Handed over by UUID (the dispatcher's rule), or by index where NVML was absent.
        uuids = [
            i
            if not i.isdigit()
            else pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(int(i)))
            for i in ids
        ]
        return [u.decode() if isinstance(u, bytes) else str(u) for u in uuids]
    except Exception:  # noqa: BLE001 - no NVML: nothing to compare against
        return None


def _visible_gpus() -> list[dict[str, str]]:
    """Name and UUID of every GPU this process's CUDA sees (CUDA_VISIBLE_DEVICES applied)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        uuid = str(props.uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        gpus.append({"name": props.name, "uuid": uuid})
    return gpus


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _measure(
    generate: Callable[[int], Any],
    new_tokens: int,
    repeats: int,
    sync: Callable[[], None],
    energy: Callable[[], dict[str, float]] | None,
) -> dict[str, Any]:
    """Prefill runs, then full runs, each with its own energy window."""
    windows: dict[str, Any] = {}
    for phase, tokens in (("prefill", 1), ("full", new_tokens)):
        before = energy() if energy else None
        start_wall = time.time()
        times = [_timed(lambda tokens=tokens: generate(tokens), sync) for _ in range(repeats)]
        after = energy() if energy else None
        windows[phase] = {
            "times_s": times,
            "start_wall": start_wall,
            "end_wall": time.time(),
            "energy_j": {u: (after[u] - before[u]) / 1e3 for u in before}
            if before is not None and after is not None
            else None,
        }
    return windows


def _summarise(
    windows: dict[str, Any], batch: int, new_tokens: int, repeats: int
) -> dict[str, Any]:
    """Per-generation times, throughput and energy from the two measured windows."""
    prefill_s = statistics.median(windows["prefill"]["times_s"])
    total_s = statistics.median(windows["full"]["times_s"])
    decode_s = max(total_s - prefill_s, 0.0)
    output_tokens = batch * new_tokens
    out: dict[str, Any] = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "output_tokens": output_tokens,
        "tokens_per_s": output_tokens / total_s,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode_s if decode_s > 0 else None,
        "energy_j": None,
        "full_window_energy_j": None,
        "j_per_token": None,
        "prefill_energy_j": None,
        "decode_j_per_token": None,
        "avg_power_w": None,
    }
    full, prefill = windows["full"]["energy_j"], windows["prefill"]["energy_j"]
    if full is None or prefill is None:
        return out
    energy = sum(full.values()) / repeats
    prefill_energy = sum(prefill.values()) / repeats
    window_s = windows["full"]["end_wall"] - windows["full"]["start_wall"]
    out.update(
        # The whole `full` window (all repeats, all GPUs): what `measure:` compares.
        full_window_energy_j=sum(full.values()),
        energy_j=energy,
        j_per_token=energy / output_tokens,
        prefill_energy_j=prefill_energy,
        decode_j_per_token=(energy - prefill_energy) / (batch * (new_tokens - 1))
        if new_tokens > 1
        else None,
        avg_power_w=sum(full.values()) / window_s if window_s > 0 else None,
    )
    return out


def _per_run(energy: dict[str, float] | None, repeats: int) -> dict[str, float] | None:
    return {u: j / repeats for u, j in energy.items()} if energy is not None else None


def _check_gpus(config: dict[str, Any], gpus: list[dict[str, str]]) -> list[str] | None:
    """Refuse to measure on GPUs other than the ones assigned (UUIDs through NVML)."""
    wanted = int(config.get("gpus", 1))
    if gpus and len(gpus) != wanted:
        raise RuntimeError(f"the config asks for {wanted} GPU(s) but CUDA sees {len(gpus)}")
    assigned = _assigned_uuids()
    if gpus and assigned and sorted(assigned) != sorted(g["uuid"] for g in gpus):
        raise RuntimeError(f"assigned GPUs {assigned} but CUDA sees {[g['uuid'] for g in gpus]}")
    return assigned


def _mark_work() -> None:
    """Tell llem-dispatch the measured work starts now (a `work` mark, for `gate_to_work_s`)."""
    path = os.environ.get("LLEM_MARKS_PATH")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"mark": "work", "t": time.time()}) + "\n")


def write_weights(model: str, folder: str, dtype: str = "bf16") -> str:
    """Save a random-weight Llama of size `model` to `folder` (safetensors), once."""
    import torch

    target = os.path.join(folder, f"{model}-{dtype}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = build_model({"model": model, "dtype": dtype}, [device])
    built.save_pretrained(target, safe_serialization=True)
    return target


def _weights_path(config: dict[str, Any]) -> str:
    folder = str(config["weights_dir"])
    return os.path.join(
        folder, f"{config.get('model', 'llama-0.1b')}-{config.get('dtype', 'bf16')}"
    )


def load_model(config: dict[str, Any], device: Any) -> Any:
    """The config's model from its saved weights (`weights_dir`), straight onto `device`."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, DTYPES[str(config.get("dtype", "bf16"))])
    # Host memory is from_pretrained's default; a device_map (straight onto a GPU)
    # needs accelerate, which the example's image has and a CPU-only venv may not.
    placed = {} if str(device) == "cpu" else {"device_map": device}
    model = LlamaForCausalLM.from_pretrained(_weights_path(config), dtype=dtype, **placed)
    model.eval()
    return model


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Generate `max_new_tokens` greedily for a batch; report times, energy, memory, GPUs.

    With `weights_dir` in the config the weights are read from disk (saved by
    `write_weights`) after the gate, as most real experiments do; otherwise the
    model is built with random weights on the GPU.
    """
    import torch

    gpus = _visible_gpus()
    assigned = _check_gpus(config, gpus)
    devices: list[Any] = [f"cuda:{i}" for i in range(len(gpus))] or ["cpu"]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if config.get("weights_dir") and len(devices) == 1:
        model = load_model(config, devices[0])
    else:
        model = build_model(config, devices)
    if gpus:
        torch.cuda.synchronize(devices[0])
    timings["load_s"] = time.perf_counter() - start
    steps = _generate_and_measure(config, model, devices, gpus, assigned, timings)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            result: dict[str, Any] = stop.value
            return result
        _mark_work()


def prepared(config: dict[str, Any]) -> Any:
    """`run` with a prepare phase (a generator: llem-dispatch's container protocol).

    Before its first `yield` (the gate) it touches no GPU: imports, and the weights
    read from disk into host memory. After it, the model moves to the GPU, warms up,
    marks its measured work with the second `yield`, and returns the result.
    """
    import torch

    start = time.perf_counter()
    cpu_model = load_model(config, "cpu")
    with torch.no_grad():
        # Into this process's memory, not pages of a memory-mapped file still to be read.
        for tensor in [*cpu_model.parameters(), *cpu_model.buffers()]:
            tensor.data = tensor.data.clone()
    read_s = time.perf_counter() - start
    yield  # prepared: wait here until the GPU is this experiment's
    gpus = _visible_gpus()
    assigned = _check_gpus(config, gpus)
    devices: list[Any] = [f"cuda:{i}" for i in range(len(gpus))] or ["cpu"]
    start = time.perf_counter()
    model = cpu_model.to(devices[0])
    if gpus:
        torch.cuda.synchronize(devices[0])
    timings = {"host_read_s": read_s, "load_s": time.perf_counter() - start}
    result = yield from _generate_and_measure(config, model, devices, gpus, assigned, timings)
    return result


def _generate_and_measure(
    config: dict[str, Any],
    model: Any,
    devices: list[Any],
    gpus: list[dict[str, str]],
    assigned: list[str] | None,
    timings: dict[str, float],
) -> Any:
    """Warm up, yield once (measuring starts now), measure; return the result."""
    import torch
    import transformers

    batch = int(config.get("batch_size", 1))
    prompt_tokens = int(config.get("prompt_tokens", 256))
    new_tokens = int(config.get("max_new_tokens", 128))
    repeats = int(config.get("repeats", 2))
    vocab = int(model.config.vocab_size)
    prompts = torch.randint(
        3, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(1)
    ).to(devices[0])
    mask = torch.ones_like(prompts)

    def generate(tokens: int) -> Any:
        with torch.inference_mode():
            return model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )

    def sync() -> None:
        for device in devices if gpus else ():
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    produced = generate(new_tokens).shape[1] - prompt_tokens  # warm-up, not measured
    if produced != new_tokens:
        raise RuntimeError(f"generated {produced} tokens, expected {new_tokens}")
    timings["warmup_s"] = time.perf_counter() - start
    for device in devices if gpus else ():
        torch.cuda.reset_peak_memory_stats(device)
    energy = _nvml_energy_reader([g["uuid"] for g in gpus]) if gpus else None
    yield  # measuring starts now
    windows = _measure(generate, new_tokens, repeats, sync, energy)
    peak = [torch.cuda.max_memory_allocated(d) / 2**30 for d in devices] if gpus else None
    return {
        "model": str(config.get("model", "llama-0.1b")),
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "batch_size": batch,
        "dtype": str(config.get("dtype", "bf16")),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": new_tokens,
        "repeats": repeats,
        **_summarise(windows, batch, new_tokens, repeats),
        "peak_memory_gib": sum(peak) if peak is not None else None,
        "peak_memory_gib_per_gpu": peak,
        # Per generation, like energy_j; `windows` keeps the raw window deltas.
        "energy_j_per_gpu": _per_run(windows["full"]["energy_j"], repeats),
        "prefill_energy_j_per_gpu": _per_run(windows["prefill"]["energy_j"], repeats),
        "windows": windows,
        "gpu_name": ",".join(sorted({g["name"] for g in gpus})) or "cpu",
        "gpu_uuids": ",".join(g["uuid"] for g in gpus),
        "assigned_uuids": assigned,
        "llem_gpu_ids": os.environ.get("LLEM_GPU_IDS", ""),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "start_wall": windows["prefill"]["start_wall"],
        "end_wall": windows["full"]["end_wall"],
        "phases_s": timings,
    }


def main(argv: list[str] | None = None) -> int:
    """`python experiment.py --write-weights DIR MODEL...`: save random weights once."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-weights", metavar="DIR", required=True)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args(argv)
    for model in args.models:
        start = time.perf_counter()
        path = write_weights(model, args.write_weights, args.dtype)
        print(f"{path}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
