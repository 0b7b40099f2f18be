"""Training past one machine (issue 14.5): two torchrun "machines" on loopback train exactly
what one machine with two processes trains, checkpoints carry over between the layouts (with
or without a shared disk), the memory/compute savers (gradient checkpointing, FLIP patch
dropout) do what they claim, and the SLURM and Spark recipes parse with the tools that run
them (sbatch script -> torchrun's own parser -> witforge train on a real build; Spark's own
properties parser; pipeline.config's loader)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from open_clip.loss import ClipLoss

import training.model  # noqa: F401  (registers the witforge-* configs with open_clip)
from pipeline import cli
from pipeline.config import ConfigError, load_build
from pipeline.stage import get_spec, stage_dir
from training.data import LoaderConfig, make_loader
from training.options import TrainOptions, parse_options
from training.toydata import write_toy_shards
from training.train import build_model, main, train_step

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS, STOP = 6, 3
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale_shards")
    write_toy_shards(d, 96, per_shard=24, size=32)
    return d


def _train_args(shards: Path, out: str, *extra: str) -> list[str]:
    # default loader (resampled rounds, shuffle buffer, random crops): all of it must line up
    return ["-m", "training.train", "--train-data", str(shards), "--model", "witforge-micro",
            "--batch-size", "8", "--workers", "0", "--warmup", "2", "--lr", "1e-3",
            "--steps", str(STEPS), "--save-every", str(STOP), "--seed", "3",
            "--shuffle-buffer", "20", "--threads", "1", "--out", out, *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> None:
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err.decode()[-3000:]
    finally:
        for p in procs:  # SIGTERM first: torchrun then stops its workers (own sessions)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def one_machine(cwd: Path, args: list[str]) -> None:
    """torchrun --nnodes 1 --nproc_per_node 2."""
    cwd.mkdir(parents=True, exist_ok=True)
    _wait([subprocess.Popen([*TORCHRUN, "--standalone", "--nnodes", "1", "--nproc_per_node",
                             "2", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)])


def two_machines(cwds: list[Path], args: list[str]) -> None:
    """Two torchrun launches (--nnodes 2 --nproc_per_node 1, node ranks 0 and 1) meeting at
    127.0.0.1; each "machine" runs in its own folder, so a relative --out is a local disk."""
    port = str(_free_port())
    procs = []
    for node, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(
            [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
             "--master_addr", "127.0.0.1", "--master_port", port, *args],
            cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    _wait(procs)


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _ckpt(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"step_{step:06d}.pt", weights_only=True)


def _same_steps(rows: list[dict], reference: list[dict]) -> None:
    """Same batches (fingerprint of rank 0's keys), sample counts and global-batch losses."""
    ref = {r["step"]: r for r in reference}
    for r in rows:
        assert r["batch"] == ref[r["step"]]["batch"], r["step"]
        assert r["samples_seen"] == ref[r["step"]]["samples_seen"]
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], abs=1e-6), r["step"]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """The reference (1 machine x 2 processes, 6 steps uninterrupted) and a 2-machine run of
    the same recipe stopped after step 3 (same schedule)."""
    base = tmp_path_factory.mktemp("scale_runs")
    one_machine(base / "one", _train_args(shards, "run"))
    two_machines([base / "m0", base / "m1"], _train_args(shards, "run", "--stop-at", str(STOP)))
    return {"base": base, "one": base / "one" / "run", "two": base / "m0" / "run"}


def test_two_machines_train_the_same_steps_as_one_machine(runs):
    one, two = runs["one"], runs["two"]
    ref, rows = _rows(one), _rows(two)
    assert [r["step"] for r in rows] == [1, 2, 3]
    _same_steps(rows, ref)
    assert ref[0]["loss"] != pytest.approx(ref[STEPS - 1]["loss"], abs=1e-3)  # it trains
    # only global rank 0 writes: the second machine's folder got nothing
    assert not (runs["base"] / "m1" / "run").exists()
    s = json.loads((two / "summary.json").read_text())
    assert (s["world_size"], s["nodes"], s["global_batch"]) == (2, 2, 16)
    assert json.loads((one / "summary.json").read_text())["nodes"] == 1
    # the checkpoints hold the same loader positions (every rank's) and the same weights
    a, b = _ckpt(one, STOP), _ckpt(two, STOP)
    assert a["loader"] == b["loader"] and set(a["loader"]) == {"0", "1"}
    assert a["layout"] == {"world_size": 2, "nodes": 1, "nproc_per_node": 2, "worker_roles": 1}
    assert b["layout"] == {"world_size": 2, "nodes": 2, "nproc_per_node": 1, "worker_roles": 1}
    worst = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item()
                for k in a["state_dict"])
    assert worst <= 1e-6


def test_a_two_machine_checkpoint_resumes_on_one_machine_with_two_processes(runs, shards):
    out = runs["base"] / "resumed_one" / "run"
    shutil.copytree(runs["two"], out)
    one_machine(out.parent, _train_args(shards, "run", "--resume", "latest"))
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    _same_steps(rows[STOP:], _rows(runs["one"]))  # the same next batches and losses
    assert _ckpt(out, STEPS)["loader"] == _ckpt(runs["one"], STEPS)["loader"]


def test_two_machines_resume_without_a_shared_disk(runs, shards):
    """Machine 1 has no checkpoint (only rank 0 wrote, on machine 0's disk): it gets rank 0's
    state over the process group instead of starting afresh and running out of step."""
    m0, m1 = runs["base"] / "again0", runs["base"] / "again1"
    shutil.copytree(runs["two"], m0 / "run")
    two_machines([m0, m1], _train_args(shards, "run", "--resume", "latest"))
    _same_steps(_rows(m0 / "run")[STOP:], _rows(runs["one"]))
    assert _ckpt(m0 / "run", STEPS)["loader"] == _ckpt(runs["one"], STEPS)["loader"]
    assert not (m1 / "run").exists()


def test_resume_refuses_another_loader_worker_count(shards, tmp_path, capsys):
    args = _train_args(shards, str(tmp_path / "run"), "--steps", "2", "--save-every", "1")[2:]
    assert main([*args, "--stop-at", "1"]) == 0
    assert main([*args, "--resume", "latest", "--workers", "2"]) == 2
    assert re.search(r"written with 1 loader worker\(s\) per process.*resume with --workers 1",
                     capsys.readouterr().err)


# -- gradient checkpointing and patch dropout ---------------------------------------------
def _batch(shards: Path, eval_pre, tokenizer, n: int = 16):
    cfg = LoaderConfig([str(shards)], batch_size=n, seed=1, shuffle_buffer=0)
    images, texts, _ = next(iter(make_loader(cfg, eval_pre, tokenizer)))
    return images, texts


def _model(**kw):
    torch.manual_seed(0)
    return build_model(TrainOptions(model="witforge-micro", **kw), torch.device("cpu"))


def _count_calls(module: torch.nn.Module) -> list[int]:
    # a pre-hook: torch's non-reentrant checkpoint stops a recomputation as soon as it has
    # what backward needs, before the block returns (a forward hook would not see it)
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_grad_checkpointing_gives_the_same_loss_and_gradients(shards):
    results = {}
    for on in (False, True):
        model, _, eval_pre, tok = _model(grad_checkpointing=on)
        batch = _batch(shards, eval_pre, tok)
        blocks = [_count_calls(model.visual.transformer.resblocks[0]),
                  _count_calls(model.transformer.resblocks[0])]
        model.train()
        loss = train_step(model, ClipLoss(), [batch], contextlib.nullcontext)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[on] = (float(loss), grads, [c[0] for c in blocks])
    (loss_off, g_off, calls_off), (loss_on, g_on, calls_on) = results[False], results[True]
    # checkpointing is really on: each block's forward runs again in the backward pass
    assert calls_off == [1, 1] and calls_on == [2, 2]
    assert loss_on == pytest.approx(loss_off, abs=1e-6)
    assert g_on.keys() == g_off.keys() and len(g_on) > 20
    for name in g_off:
        torch.testing.assert_close(g_on[name], g_off[name], atol=1e-6, rtol=1e-5, msg=name)


def test_patch_dropout_changes_training_passes_only(shards):
    plain, _, eval_pre, tok = _model()
    dropped, *_ = _model(patch_dropout=0.5)
    for k, v in plain.state_dict().items():  # the same weights: patch dropout has none
        assert torch.equal(v, dropped.state_dict()[k])
    images, texts = _batch(shards, eval_pre, tok)
    tokens_seen = []
    dropped.visual.ln_pre.register_forward_hook(lambda m, i, o: tokens_seen.append(o.shape[1]))

    def features(model, train: bool, seed: int = 0):
        model.train(train)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model(images, texts)
        return out[0] if isinstance(out, tuple) else out["image_features"]

    ref_train, ref_eval = features(plain, True), features(plain, False)
    torch.testing.assert_close(ref_train, ref_eval)  # nothing else differs between modes
    # training: a random half of the 16 patches (plus the class token) goes through the ViT
    train_a, train_b = features(dropped, True, 0), features(dropped, True, 1)
    assert tokens_seen == [1 + 8, 1 + 8]
    assert (train_a - ref_train).abs().max() > 1e-3
    assert (train_a - train_b).abs().max() > 1e-3  # the kept patches are drawn per pass
    # eval: every patch, the no-dropout model's output exactly
    assert torch.equal(features(dropped, False), ref_eval)
    assert tokens_seen[-1] == 1 + 16


def test_patch_dropout_refuses_an_image_tower_without_patches(tmp_path):
    import open_clip

    rn = dict(json.loads((ROOT / "training" / "model_configs" / "witforge-micro.json")
                         .read_text()))
    rn["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}  # a ResNet
    (tmp_path / "scale-test-rn.json").write_text(json.dumps(rn))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(ValueError, match=r"train\.patch_dropout: scale-test-rn's image tower "
                                         r"is not a ViT"):
        build_model(TrainOptions(model="scale-test-rn", patch_dropout=0.5),
                    torch.device("cpu"))


def test_patch_dropout_training_resumes_exactly(shards, tmp_path):
    def run(out, *extra):
        args = _train_args(shards, str(out), "--steps", "4", "--save-every", "2", *extra)[2:]
        assert main(args) == 0
        return _rows(out)

    full = run(tmp_path / "full", "--patch-dropout", "0.5")
    run(tmp_path / "cut", "--patch-dropout", "0.5", "--stop-at", "2")
    resumed = run(tmp_path / "cut", "--patch-dropout", "0.5", "--resume", "latest")
    _same_steps(resumed, full)  # the kept patches are a function of (seed, rank, step)
    plain = run(tmp_path / "plain")
    assert plain[0]["batch"] == full[0]["batch"]
    assert plain[0]["loss"] != pytest.approx(full[0]["loss"], abs=1e-4)
    opts = json.loads((tmp_path / "full" / "options.json").read_text())
    assert (opts["patch_dropout"], opts["grad_checkpointing"]) == (0.5, False)


@pytest.mark.slow  # two more torchrun launches (~25 s on a busy 2-core machine)
def test_savers_under_ddp_on_two_machines_match_one_machine(runs, shards, tmp_path):
    """Checkpointing under DDP (non-reentrant: no 'marked ready twice'), and patch dropout
    drawing the same patches per global rank whatever the machine layout."""
    extra = ("--grad-checkpointing", "--patch-dropout", "0.5")
    one_machine(tmp_path / "one", _train_args(shards, "run", *extra))
    two_machines([tmp_path / "m0", tmp_path / "m1"], _train_args(shards, "run", *extra))
    rows = _rows(tmp_path / "one" / "run")
    _same_steps(_rows(tmp_path / "m0" / "run"), rows)
    plain = _rows(runs["one"])
    assert [r["batch"] for r in rows] == [r["batch"] for r in plain]  # same data,
    assert rows[0]["loss"] != pytest.approx(plain[0]["loss"], abs=1e-4)  # fewer patches


def test_savers_as_build_keys_and_flags(tmp_path):
    y = tmp_path / "b.yaml"
    y.write_text("name: b\nsources: [{path: m.jsonl}]\n"
                 "train: {grad_checkpointing: true, patch_dropout: 0.5}\n")
    o = parse_options(["--build", str(y)])
    assert (o.grad_checkpointing, o.patch_dropout) == (True, 0.5)
    o = parse_options(["--build", str(y), "--patch-dropout", "0.25"])
    assert o.patch_dropout == 0.25
    o = parse_options(["--train-data", "x", "--out", "y", "--grad-checkpointing"])
    assert (o.grad_checkpointing, o.patch_dropout) == (True, 0.0)
    with pytest.raises(SystemExit, match=r"--patch-dropout \(train.patch_dropout\) must be in"):
        parse_options(["--train-data", "x", "--out", "y", "--patch-dropout", "1"])
    y.write_text("name: b\nsources: [{path: m.jsonl}]\ntrain: {patch_dropout: 1.5}\n")
    with pytest.raises(ConfigError, match=r"train\.patch_dropout: must be in \[0, 1\)"):
        load_build(y)
    y.write_text("name: b\nsources: [{path: m.jsonl}]\ntrain: {grad_checkpointing: 1}\n")
    with pytest.raises(ConfigError, match=r"train\.grad_checkpointing: expected true/false"):
        load_build(y)


# -- recipes -------------------------------------------------------------------------------
SBATCH = RECIPES / "slurm_train.sbatch"
STUBS = {
    # SLURM's commands as this machine has them: scontrol expands the node list, srun records
    # its command line and (SRUN_EXEC=1) runs it once per node, as srun's one task per node.
    "scontrol": '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] || exit 2\n'
                'printf "%s\\n" $STUB_HOSTS\n',
    "srun": '#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_RECORD"\n'
            '[ -n "${SRUN_EXEC:-}" ] || exit 0\nwhile [[ "$1" == --* ]]; do shift; done\n'
            'pids=()\nfor ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do\n'
            '  SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!)\ndone\n'
            'for p in "${pids[@]}"; do wait "$p" || exit 1; done\n',
}


def sbatch_options(text: str) -> dict[str, str]:
    """#SBATCH --key=value lines; sbatch reads them only before the first command."""
    opts, body_started = {}, False
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            assert not body_started, f"{line!r} comes after a command: sbatch ignores it"
            key, _, value = line.split(None, 1)[1].partition("=")
            opts[key.lstrip("-")] = value
        elif line.strip() and not line.startswith("#"):
            body_started = True
    return opts


def render_sbatch(tmp: Path, env: dict[str, str], *args: str,
                  execute: bool = False) -> list[str]:
    """Run the sbatch script as SLURM would on the first node; srun's argv."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    record = tmp / "srun.argv"
    run_env = dict(ENV, PATH=f"{bin_dir}:{os.environ['PATH']}", SRUN_RECORD=str(record), **env)
    if execute:
        run_env["SRUN_EXEC"] = "1"
    subprocess.run(["bash", str(SBATCH), *args], cwd=ROOT, env=run_env, check=True,
                   timeout=240, capture_output=True)
    return record.read_bytes().decode().split("\0")[:-1]


def _slurm_env(opts: dict[str, str], hosts: str, **extra: str) -> dict[str, str]:
    # what sbatch exports from the #SBATCH lines
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": opts["nodes"],
            "SLURM_NNODES": opts["nodes"], "SLURM_JOB_NODELIST": "gpu[001-002]",
            "SLURM_GPUS_ON_NODE": opts["gpus-per-node"], "STUB_HOSTS": hosts, **extra}


def test_slurm_recipe_renders_a_torchrun_command_torchrun_and_witforge_accept(tmp_path,
                                                                             monkeypatch):
    from torch.distributed.run import config_from_args, get_args_parser

    opts = sbatch_options(SBATCH.read_text())
    assert opts["ntasks-per-node"] == "1"  # one torchrun per node; it starts the processes
    argv = render_sbatch(tmp_path, _slurm_env(opts, "gpu001 gpu002"), "--steps", "20000")
    srun_opts = [a for a in argv[:argv.index(".venv/bin/torchrun")]]
    assert "--ntasks-per-node=1" in srun_opts
    args = get_args_parser().parse_args(argv[len(srun_opts) + 1:])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it for us
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # and make its log folder here
    config, cmd, cmd_args = config_from_args(args)
    assert (config.min_nodes, config.max_nodes) == (2, 2) == (int(opts["nodes"]),) * 2
    assert config.nproc_per_node == int(opts["gpus-per-node"]) == 8
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == (
        "c10d", "gpu001:29500", "4242")  # the allocation's first host serves the rendezvous
    assert cmd == ".venv/bin/witforge" and cmd_args[0] == "train"
    assert cmd_args[1:] == ["--build", "manifests/demo.yaml", "--resume", "latest",
                            "--steps", "20000"]
    # the command line witforge's own CLI dispatches, on the real demo build
    assert cli.TOOLS[cmd_args[0]][0] == "training.train"
    o = parse_options(cmd_args[1:])
    demo = load_build(ROOT / "manifests" / "demo.yaml")
    assert o.out == str(demo.run_dir / "train") and o.steps == 20000
    assert o.train_data == [str(stage_dir(demo, get_spec("shard")))]
    assert o.resume == "latest" and o.batch_size == demo.train.batch_size


@pytest.mark.slow  # ~15 s on a busy 2-core machine; the render test above runs by default
def test_slurm_recipe_trains_on_two_loopback_nodes(tmp_path, shards):
    """The recipe's own command line, run: two torchruns meet through c10d at 127.0.0.1."""
    y = tmp_path / "b.yaml"
    y.write_text(f"name: slurm\nruns_dir: {tmp_path / 'runs'}\nsources: [{{path: m.jsonl}}]\n"
                 "train: {model: witforge-micro, batch_size: 8, steps: 2, warmup: 1, "
                 "workers: 0, threads: 1, save_every: 1, shuffle_buffer: 10}\n")
    shard_dir = stage_dir(load_build(y), get_spec("shard"))
    shutil.copytree(shards, shard_dir)
    opts = sbatch_options(SBATCH.read_text())
    env = _slurm_env(opts, "127.0.0.1", BUILD=str(y), NPROC_PER_NODE="1",
                     RDZV_PORT=str(_free_port()))
    render_sbatch(tmp_path, env, execute=True)
    out = tmp_path / "runs" / "slurm" / "train"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["nodes"]) == (2, 2, 2)
    assert (out / "model.pt").is_file()


def test_spark_recipe_is_a_valid_build_with_the_pyspark_distributor():
    recipe = RECIPES / "spark_crawl.yaml"
    cfg = load_build(recipe)  # the real loader: every key known, every value in range
    assert cfg.crawl.distributor == "pyspark" and cfg.crawl.guard
    filters = {p.stem for p in (ROOT / "pipeline" / "sql" / "filters").glob("*.sql")}
    assert set(cfg.text_filter.filters) <= filters
    assert set(cfg.image_filter.filters) <= filters
    # the launch line in its header: the witforge command parses with witforge's own CLI
    launch = next(ln.lstrip("# ") for ln in recipe.read_text().splitlines()
                  if "PYSPARK_SUBMIT_ARGS=" in ln)
    words = shlex.split(launch)
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    command = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    assert command[0] == ".venv/bin/witforge"
    ns = cli._parser().parse_args(command[1:])
    assert ns.command == "run" and Path(ns.build) == recipe.relative_to(ROOT)
    assert env["PYSPARK_PYTHON"] == "$PWD/.venv/bin/python"
    submit = shlex.split(env["PYSPARK_SUBMIT_ARGS"])
    assert submit[-1] == "pyspark-shell"  # pyspark's launcher needs it last
    assert submit[submit.index("--master") + 1].startswith("spark://")
    assert submit[submit.index("--properties-file") + 1] == "recipes/spark-defaults.conf"
    # the cluster start-up lines name scripts the venv's pyspark really ships (it has no
    # start-master.sh) and the classes tests/spark_cluster.py starts the same way
    import pyspark

    scripts = [m.group(1) for m in re.finditer(r"\$SPARK_HOME/(\S+)", recipe.read_text())]
    assert "sbin/spark-daemon.sh" in scripts
    assert all((Path(pyspark.__file__).parent / s).is_file() for s in scripts), scripts
    from tests.spark_cluster import MASTER, WORKER

    assert f"start {MASTER} 1" in recipe.read_text() and f"start {WORKER} 1" in recipe.read_text()


def test_spark_reads_the_recipe_settings_with_its_own_parser(tmp_path):
    """spark-submit (pyspark's launcher, as the crawl worker starts it) loads the recipe's
    properties file; Spark's typed getters accept every value."""
    props = RECIPES / "spark-defaults.conf"
    lines = [ln.split(None, 1) for ln in props.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    ours = {k: v.strip() for k, v in lines}
    script = tmp_path / "conf.py"
    script.write_text(
        "import json\nfrom pyspark.java_gateway import launch_gateway\n"
        "gw = launch_gateway()\nc = gw.jvm.org.apache.spark.SparkConf(True)\n"
        "print(json.dumps({'all': {t._1(): t._2() for t in c.getAll()},\n"
        " 'cores': c.getInt('spark.executor.cores', 0),\n"
        " 'memory_mb': c.getSizeAsMb('spark.executor.memory'),\n"
        " 'overhead_mb': c.getSizeAsMb('spark.executor.memoryOverhead'),\n"
        " 'timeout_s': c.getTimeAsSeconds('spark.network.timeout'),\n"
        " 'failures': c.getInt('spark.task.maxFailures', 0)}))\n")
    env = dict(ENV, PYSPARK_SUBMIT_ARGS=f"--master local[1] --properties-file {props} "
               "pyspark-shell")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: got["all"].get(k) for k in ours} == ours  # no key dropped as non-Spark
    assert (got["cores"], got["memory_mb"], got["overhead_mb"]) == (16, 16384, 8192)
    assert (got["timeout_s"], got["failures"]) == (600, 100)
