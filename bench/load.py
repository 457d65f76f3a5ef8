"""Load benchmark: the floor (reading the bytes), the guide's path, and ours, side by side in one run.

    python bench/load.py                      # builds the synthetic checkpoints once, then measures
    python bench/load.py --repeat 3 --children 1,2,4

Builds, with random values, an EXAONE-3.5-2.4B checkpoint in the published layout (real
dimensions, remote-code key names, two fp32 shards, tied embeddings without the config key) with a
LoRA adapter (r=16 on all seven projections, remote-code names), and a KoELECTRA-small one with a
SEQ_CLS adapter. Random values load exactly like trained ones. Then, each in a fresh process, cold
(the files evicted from the page cache) and warm, it times:

- ``floor``: reading the bytes a path must read (the checkpoint for the guide, the snapshot for us),
  both with ``read()`` into a buffer and by populating a mapping (``MADV_POPULATE_READ``, no copy);
  the faster of the two is the floor the ratios use;
- ``guide``: ``from_pretrained`` with the guide's switches + ``PeftModel.from_pretrained``;
- ``first``: our snapshot strategy on its first start, as a worker starts: it serves from the
  checkpoint once loaded, then builds the snapshot (timed apart, as ``snapshot after ready``);
- ``snapshot``: our snapshot strategy from its snapshot.

Each reports time to ready (process start until every weight has been read by a one-token forward
pass), the load stage (the same, imports excluded), peak RSS and, in warm runs, the first
classification (the same prompt for both paths). On a CPU without native bf16 that classification's
compute is large and the same for every path, so it is timed apart and only once, warm. Then it starts real prefork
workers with N children on the snapshot and sums their PSS. It prints a table and the ratios, and
one JSON line with every figure. The tokenizer is a small byte-level BPE, not EXAONE's 102k one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAONE_24B = {
    "hidden_size": 2560, "intermediate_size": 7168, "num_layers": 30, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 80, "vocab_size": 102400, "max_position_embeddings": 32768,
}
KOELECTRA_SMALL = {"vocab_size": 35000, "embedding_size": 128, "hidden_size": 256, "num_hidden_layers": 12,
                   "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 512}
TEXT = "무료 쿠폰 당첨! 지금 바로 링크를 클릭하세요"


# --- building the synthetic checkpoints -----------------------------------------------------------


def build_exaone(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from tests import factories

    if (out / "model.safetensors.index.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    factories.build_bytelevel_tokenizer(out)
    config = factories.exaone_config_dict(EXAONE_24B["vocab_size"])
    config.update(EXAONE_24B)
    config["rope_scaling"]["original_max_position_embeddings"] = 8192
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"transformer.wte.weight": (config["vocab_size"], h), "transformer.ln_f.weight": (h,)}
    for n in range(config["num_layers"]):
        p = f"transformer.h.{n}."
        shapes.update({
            p + "ln_1.weight": (h,), p + "ln_2.weight": (h,),
            p + "attn.attention.q_proj.weight": (h, h), p + "attn.attention.k_proj.weight": (kv, h),
            p + "attn.attention.v_proj.weight": (kv, h), p + "attn.attention.out_proj.weight": (h, h),
            p + "mlp.c_fc_0.weight": (i, h), p + "mlp.c_fc_1.weight": (i, h), p + "mlp.c_proj.weight": (h, i),
        })
    names = list(shapes)
    half = len(names) // 2
    weight_map, total = {}, 0
    for k, part in enumerate((names[:half], names[half:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {n: torch.empty(shapes[n], dtype=torch.float32).normal_(0, 0.02) for n in part}
        for n in part:
            if n.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                tensors[n].fill_(1.0)
        save_file(tensors, out / fname, metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update(dict.fromkeys(part, fname))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config, indent=1))


def build_exaone_adapter(out: Path, base: Path, r: int = 16) -> None:
    import torch
    from safetensors.torch import save_file

    if (out / "adapter_config.json").is_file():
        return
    config = json.loads((base / "config.json").read_text())
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"] * config["head_dim"]
    dims = {"attn.attention.q_proj": (h, h), "attn.attention.k_proj": (h, kv), "attn.attention.v_proj": (h, kv),
            "attn.attention.out_proj": (h, h), "mlp.c_fc_0": (h, i), "mlp.c_fc_1": (h, i), "mlp.c_proj": (i, h)}
    tensors = {}
    for n in range(config["num_layers"]):
        for module, (fan_in, fan_out) in dims.items():
            key = f"base_model.model.transformer.h.{n}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, fan_in) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, r) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
        "target_modules": ["c_fc_0", "c_fc_1", "c_proj", "k_proj", "out_proj", "q_proj", "v_proj"],
        "base_model_name_or_path": str(base), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
    }, indent=1))


def build_koelectra(out: Path) -> tuple[Path, Path]:
    import torch
    from transformers import ElectraForPreTraining

    from tests import factories

    base, adapter = out / "koelectra-small", out / "koelectra-lora"
    if (adapter / "adapter_config.json").is_file():
        return base, adapter
    base.mkdir(parents=True, exist_ok=True)
    factories.build_wordpiece_tokenizer(base)
    config = factories.electra_config(KOELECTRA_SMALL["vocab_size"])
    for key, value in KOELECTRA_SMALL.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    ElectraForPreTraining(config).save_pretrained(base)
    factories.build_koelectra_adapter(adapter, base)
    return base, adapter


# --- one measurement in a fresh process ------------------------------------------------------------


def child(mode: str, model: str, base: str, adapter: str, snapshots: str, classify: str = "1") -> dict:
    """Runs in a fresh process; ``ready_s`` runs from the parent's spawn to ``ready_at`` (wall clock),
    so the child's exit (unmapping gigabytes, freeing the model) is not counted as loading.

    ``BENCH_DEVICE`` (cpu, cuda) and ``USE_QUANTIZATION`` (EXAONE) come from the parent.
    """
    device = os.environ.get("BENCH_DEVICE", "cpu")
    quantize = model == "exaone" and os.environ.get("USE_QUANTIZATION", "").lower() == "true"
    t_import = time.perf_counter()
    if mode in ("floor", "floor-mmap"):
        files = [Path(f) for f in base.split(os.pathsep)]
        start = time.perf_counter()
        if mode == "floor-mmap":
            from worker.lifecycle.prefetch import read_into_cache

            read_into_cache(files)
            return {"load_s": time.perf_counter() - start, "bytes": sum(f.stat().st_size for f in files),
                    "ready_at": time.time()}
        buf = bytearray(64 << 20)
        view, total = memoryview(buf), 0
        for file in files:
            with file.open("rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    total += n
        return {"load_s": time.perf_counter() - start, "bytes": total, "ready_at": time.time()}
    if mode == "guide":
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        import_s = time.perf_counter() - t_import
        start = time.perf_counter()
        cls = AutoModelForCausalLM if model == "exaone" else AutoModelForSequenceClassification
        kwargs = {"device_map": {"": 0}} if device == "cuda" else {}
        if quantize:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=torch.bfloat16)
        net = cls.from_pretrained(base, dtype=torch.bfloat16 if model == "exaone" else torch.float32,
                                  use_safetensors=True, low_cpu_mem_usage=True, **kwargs)
        net = PeftModel.from_pretrained(net, adapter).eval()
        tokenizer = AutoTokenizer.from_pretrained(base)
        with torch.inference_mode():
            net(**tokenizer(["."], return_tensors="pt").to(net.device))  # reads every weight
            _sync(device)
            load_s = time.perf_counter() - start
            start = time.perf_counter()
            if classify == "1":
                text = _prompt(tokenizer) if model == "exaone" else TEXT
                net(**tokenizer([text], add_special_tokens=model != "exaone", return_tensors="pt").to(net.device))
                _sync(device)
        classify_s = time.perf_counter() - start
        source, stages = "checkpoint", {}
    else:  # as the worker does: read the weights while the libraries import (before the fork, for prefork)
        from worker.lifecycle import prefetch
        from worker.settings import Settings

        settings = Settings.from_env({
            "DEVICE": device, "TORCH_DTYPE": "bfloat16" if model == "exaone" else "float32", "MODEL_LOADER": "snapshot",
            "SNAPSHOT_DIR": snapshots, "USE_QUANTIZATION": str(quantize).lower(), "PRELOAD_MODELS": model,
            f"{model.upper()}_MODEL": base, f"{model.upper()}_ADAPTER_DIR": adapter,
            "PREFETCH_WEIGHTS": os.environ.get("PREFETCH_WEIGHTS", "true")}, dotenv=False)
        if settings.prefetch_weights:
            prefetch.start(settings)
        from worker.lifecycle.startup import import_libraries

        import_libraries(settings)
        from worker.loading import get_loader
        from worker.serving.classifiers import SpamClassifier

        import_s = time.perf_counter() - t_import
        start = time.perf_counter()
        # A worker's first start serves from the checkpoint and builds the snapshot after it is ready.
        loaded = get_loader(settings, serve_before_build=True).load_model(settings.source(model))
        classifier = SpamClassifier(loaded, batch_size=1)
        classifier.warm_up()  # what the worker does before it takes tasks: reads every weight
        _sync(device)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        if classify == "1":
            classifier.score([TEXT])
            _sync(device)
        classify_s = time.perf_counter() - start
        source, stages = loaded.source, loaded.timings
        ready_at = time.time()
        if loaded.finish is not None:  # what the worker then does in the background
            start = time.perf_counter()
            loaded.finish()
            stages = {**stages, "snapshot after ready": round(time.perf_counter() - start, 2)}
        return {"import_s": import_s, "load_s": load_s, "classify_s": classify_s, "source": source,
                "peak_rss_mb": _peak_rss_mb(), "stages": stages, "ready_at": ready_at}
    return {"import_s": import_s, "load_s": load_s, "classify_s": classify_s, "source": source,
            "peak_rss_mb": _peak_rss_mb(), "stages": stages, "ready_at": time.time()}


def _prompt(tokenizer) -> str:
    from worker.serving.prompt import BUILT_IN

    return BUILT_IN.render(tokenizer, TEXT)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would include the parent's from before the exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_child(mode: str, model: str, base: str, adapter: str, snapshots: Path, classify: bool) -> dict:
    spawned = time.time()
    out = subprocess.run([sys.executable, __file__, "--child", mode, model, base, adapter, str(snapshots),
                          "1" if classify else "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    exited = time.time()
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {model} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ready_at = result.pop("ready_at")
    result["ready_s"], result["exit_s"] = ready_at - spawned, exited - ready_at
    return result


def evict(paths: list[Path]) -> None:
    """Drop these files from the page cache (and everything, where the kernel lets us)."""
    subprocess.run(["sync"], check=False)
    for path in paths:
        for file in ([path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass


# --- shared memory across prefork children ---------------------------------------------------------


def pss_of_workers(children: int, base: Path, adapter: Path, snapshots: Path, redis_port: int) -> dict:
    """Start a real prefork worker with N children on the snapshot; sum the PSS of all its processes."""
    env = {**os.environ, "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
           "CELERY_RESULT_BACKEND": f"redis://127.0.0.1:{redis_port}/1", "PRELOAD_MODELS": "exaone",
           "EXAONE_MODEL": str(base), "EXAONE_ADAPTER_DIR": str(adapter), "DEVICE": "cpu",
           "TORCH_DTYPE": "bfloat16", "MODEL_LOADER": "snapshot", "SNAPSHOT_DIR": str(snapshots)}
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker", "worker", f"-c{children}",
                             "--without-mingle", "--without-gossip", "-l", "WARNING"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from producer.client import make_app
        from producer.settings import ProducerSettings

        app = make_app(ProducerSettings(env["CELERY_BROKER_URL"], env["CELERY_RESULT_BACKEND"]))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            stats = app.control.inspect(timeout=1.0).stats() or {}
            pids = {int(k.split(".")[1][3:]) for s in stats.values() for k in s if k.endswith(".exaone.load_s")}
            if len(pids) == children:
                break
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read()[-3000:])
        else:
            raise RuntimeError("workers did not load in time")
        time.sleep(1.0)
        pss = {pid: _pss_mb(pid) for pid in [proc.pid, *pids]}
        return {"children": children, "total_pss_mb": sum(pss.values()), "main_pss_mb": pss[proc.pid]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the run --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (the median is shown)")
    parser.add_argument("--children", default="1,2,4", help="prefork children counts for the PSS figures")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--only", choices=("exaone", "koelectra"), help="measure one model")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    work = args.workdir
    t = time.perf_counter()
    build_exaone(work / "exaone-2.4b")
    build_exaone_adapter(work / "exaone-lora", work / "exaone-2.4b")
    ko_base, ko_adapter = build_koelectra(work)
    print(f"checkpoints ready in {time.perf_counter() - t:.0f}s under {work}", file=sys.stderr)
    snapshots = work / "snapshots"
    os.environ["BENCH_DEVICE"] = args.device
    models = {"exaone": (work / "exaone-2.4b", work / "exaone-lora"), "koelectra": (ko_base, ko_adapter)}
    if args.only:
        models = {args.only: models[args.only]}
    results: dict[str, dict] = {}

    def measure(key: str, mode: str, model: str, cold: bool, base: str, adapter: str, reset: bool = False):
        runs = []
        for _ in range(args.repeat):
            if reset:
                for path in snapshots.glob(f"{model}-*"):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            if cold:
                evict([work])
            # The classification's compute does not depend on the cache: it is timed in warm runs only.
            runs.append(run_child(mode, model, base, adapter, snapshots, classify=not cold))
            print(f"  {key}: {runs[-1]}", file=sys.stderr)
        results[key] = {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]
                        for k in runs[0]}

    for model, (base, adapter) in models.items():
        files = _weights(base) + [adapter / "adapter_model.safetensors"]
        for temp in ("cold", "warm"):
            cold = temp == "cold"
            for how in ("floor", "floor-mmap"):
                measure(f"{model} {how} checkpoint {temp}", how, model, cold, os.pathsep.join(map(str, files)), "")
            measure(f"{model} guide {temp}", "guide", model, cold, str(base), str(adapter))
        measure(f"{model} ours first start", "first", model, True, str(base), str(adapter), reset=True)
        snapshot_files = sorted(snapshots.glob(f"{model}-*/*.safetensors"))
        for temp in ("cold", "warm"):
            cold = temp == "cold"
            for how in ("floor", "floor-mmap"):
                measure(f"{model} {how} snapshot {temp}", how, model, cold, os.pathsep.join(map(str, snapshot_files)),
                        "")
            measure(f"{model} ours snapshot {temp}", "snapshot", model, cold, str(base), str(adapter))
        prefetch = os.environ.get("PREFETCH_WEIGHTS", "true")
        os.environ["PREFETCH_WEIGHTS"] = "false"
        measure(f"{model} ours snapshot cold, no prefetch", "snapshot", model, True, str(base), str(adapter))
        os.environ["PREFETCH_WEIGHTS"] = prefetch

    pss = []
    if "exaone" in models and args.device == "cpu":
        redis = subprocess.Popen(["redis-server", "--port", "6479", "--bind", "127.0.0.1", "--save", ""],
                                 stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            pss = [pss_of_workers(int(n), *models["exaone"], snapshots, 6479) for n in args.children.split(",")]
        finally:
            redis.terminate()
    report(results, pss, list(models))


def _weights(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def report(results: dict[str, dict], pss: list[dict], models: list[str]) -> None:
    print(f"\n{'measurement':40} {'ready s':>8} {'import s':>8} {'load s':>8} {'classify s':>10} "
          f"{'peak RSS MB':>12}  source / bytes")
    for key, r in results.items():
        extra = f"{r['bytes'] / 1e9:.2f} GB" if "bytes" in r else r.get("source", "")
        print(f"{key:40} {r['ready_s']:8.2f} {r.get('import_s', 0):8.2f} {r['load_s']:8.2f} "
              f"{r.get('classify_s', 0):10.2f} {r.get('peak_rss_mb', 0):12.0f}  {extra}")
    if pss:
        print(f"\n{'prefork children':>16} {'total PSS MB':>13} {'x one child':>12}")
        one = pss[0]["total_pss_mb"]
        for p in pss:
            print(f"{p['children']:>16} {p['total_pss_mb']:13.0f} {p['total_pss_mb'] / one:12.2f}")
    print("\nratios (targets from the issue; the floor is the faster of read() and a populated mapping)")
    for model in models:
        r = results
        floor = min(r[f"{model} {how} snapshot cold"]["load_s"] for how in ("floor", "floor-mmap"))
        print(f"  {model}: snapshot load stage cold / reading the snapshot cold = "
              f"{r[f'{model} ours snapshot cold']['load_s'] / floor:.2f}"
              f"{'  (target <= 1.2)' if model == 'exaone' else ''}")
        print(f"  {model}: the same without PREFETCH_WEIGHTS (the loader reads it itself) = "
              f"{r[f'{model} ours snapshot cold, no prefetch']['load_s'] / floor:.2f}")
        print(f"  {model}: guide ready cold / snapshot ready cold = "
              f"{r[f'{model} guide cold']['ready_s'] / r[f'{model} ours snapshot cold']['ready_s']:.2f}"
              f"{'  (target >= 3)' if model == 'exaone' else ''}")
        print(f"  {model}: guide load stage cold / snapshot load stage cold = "
              f"{r[f'{model} guide cold']['load_s'] / r[f'{model} ours snapshot cold']['load_s']:.2f}")
        print(f"  {model}: guide ready warm / snapshot ready warm = "
              f"{r[f'{model} guide warm']['ready_s'] / r[f'{model} ours snapshot warm']['ready_s']:.2f}")
    if len(pss) > 1:
        print(f"  exaone: total PSS of {pss[-1]['children']} children / one child's = "
              f"{pss[-1]['total_pss_mb'] / one:.2f}  (target <= 1.3)")
    print(json.dumps({"results": results, "pss": pss}))


if __name__ == "__main__":
    main()
