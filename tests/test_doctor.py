"""The BN doctor: each problem it lists is found in a model built to have it (one test each, the
evidence checked), a healthy trained model gets no finding, and the model is never changed.

Each check runs on four sources of the same model: the Python module, and the files a user would
hand over: torch.jit.script and torch.jit.trace (torch.jit.save, loaded with torch.jit.load) and
torch.export (torch.export.save, loaded with torch.export.load); the findings must be the same."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from bnlab.doctor import diagnose, format_findings, load_model_file
from bnlab.errors import ConfigError

SOURCES = ("module", "script", "trace", "export")
# torch >= 2.10 marks TorchScript deprecated; users still hand over such files, so they are tested
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:.isinstance.treespec, LeafSpec:FutureWarning")]


def _saved(model, kind, example, folder):
    """``model`` as ``kind``: itself, or saved to a file in ``folder`` and loaded back the way a user
    hands it to the doctor (bnlab.doctor.load_model_file)."""
    if kind == "module":
        return model
    path = folder / f"model-{kind}-{id(model)}.{'pt2' if kind == 'export' else 'pt'}"
    if kind == "script":
        torch.jit.save(torch.jit.script(model), str(path))
    elif kind == "trace":
        torch.jit.save(torch.jit.trace(model, example), str(path))
    else:  # a dynamic batch, so the doctor can use other batch sizes than the example's
        dyn = ({0: torch.export.Dim("batch")},) if len(example) > 1 else None
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=dyn), str(path))
    loaded = load_model_file(path)
    assert type(loaded).__name__ == ("ExportedProgram" if kind == "export" else "RecursiveScriptModule")
    return loaded


@pytest.fixture(params=SOURCES)
def source(request, tmp_path):
    """The source kind, and a function turning a model (and an example batch) into that source."""
    return request.param, lambda model, example: _saved(model, request.param, example, tmp_path)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _net():
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def healthy(data):
    x, y = data
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def _checks(findings):
    return {(f.check, f.layer) for f in findings}


def _state(model):
    """Everything a diagnosis could change: tensors, training flags (and, for a program, its graph)."""
    if isinstance(model, torch.export.ExportedProgram):
        return ({k: v.clone() for k, v in {**model.state_dict, **model.constants}.items()},
                [str(model.graph)])
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _unchanged(before, model):
    after = _state(model)
    assert before[0].keys() == after[0].keys() and before[1] == after[1]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_a_healthy_model_has_no_finding_and_is_not_changed(healthy, data, source):
    x, y = data
    model = source[1](healthy, x[:64])
    before = _state(model)
    rng = torch.get_rng_state()
    found = diagnose(model, x[:256], y[:256])
    assert found == [], format_findings(found)
    assert format_findings(found) == "BN doctor: no problem found"
    _unchanged(before, model)
    assert torch.equal(rng, torch.get_rng_state())


def test_stale_running_statistics_and_the_train_eval_gap(healthy, data, source):
    x, y = data
    model = copy.deepcopy(healthy)
    with torch.no_grad():  # weights changed without a train-mode pass
        model[0].weight.mul_(3.0)
    found = diagnose(source[1](model, x[:64]), x[:256], y[:256])
    assert ("train_eval_gap", "") in _checks(found) and found[0].severity == "error"
    stale = [f for f in found if f.check == "stale_running_stats"]
    assert stale and stale[0].layer == "1" and "the first layer where it starts" in stale[0].evidence
    if source[0] != "module":  # the same numbers as on the Python module
        assert [f.evidence for f in found] == [f.evidence for f in diagnose(model, x[:256], y[:256])]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_decomposed_program_gives_the_same_findings(healthy, data, mode):
    """After run_decompositions BN is _native_batch_norm_legit_no_training (eval) or
    _native_batch_norm_legit_functional (train, returning new running statistics): same findings,
    same numbers, nothing changed."""
    x, y = data
    model = copy.deepcopy(healthy)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    getattr(model, mode)()
    ep = torch.export.export(model, (x[:64],), dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    op = "no_training" if mode == "eval" else "functional"
    assert any(str(n.target).endswith(f"_native_batch_norm_legit_{op}.default") for n in ep.graph.nodes)
    before = _state(ep)
    found = diagnose(ep, x[:256], y[:256])
    assert [(f.check, f.layer, f.evidence) for f in found] == \
        [(f.check, f.layer, f.evidence.replace("the layer is in training mode", "the program computes this BN in "
                                               "training mode (exported from a model in train mode)"))
         for f in diagnose(model, x[:256], y[:256])]
    assert ("bn_in_train_mode", "1") in _checks(found) if mode == "train" else "stale_running_stats" in str(found)
    _unchanged(before, ep)


def test_statistics_never_updated(data, source):
    x, y = data
    model = source[1](_net().eval(), x[:64])
    found = diagnose(model, x[:64])
    assert {("statistics_never_updated", "1"), ("statistics_never_updated", "4")} <= _checks(found)


def test_bn_in_train_mode_at_inference_and_nothing_is_changed(healthy, data, source, tmp_path):
    """A model in training mode is the one whose forward would move the running statistics and count
    batches: after the doctor the model (and its file) are as before."""
    model = source[1](copy.deepcopy(healthy).train(), data[0][:64])
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    before = _state(model)
    found = diagnose(model, data[0][:64], data[1][:64])
    assert ("bn_in_train_mode", "1") in _checks(found)
    assert ("bn_in_train_mode", "1") not in _checks(diagnose(model, data[0][:64], for_inference=False))
    _unchanged(before, model)
    assert files == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}


def test_keras_style_momentum(healthy, data, source):
    model = copy.deepcopy(healthy)
    model[4].momentum = 0.99
    f = [f for f in diagnose(source[1](model, data[0][:64]), data[0][:64]) if f.check == "keras_momentum"]
    assert [x.layer for x in f] == ["4"] and "momentum=0.01" in f[0].fix


def test_tiny_batch_and_batch_of_one(healthy, data, source):
    x = data[0]
    model = source[1](healthy, x[:64])
    assert ("tiny_batch", "1") in _checks(diagnose(model, x[:64], batch_per_process=4))
    assert ("batch_of_one", "1") in _checks(diagnose(model, x[:64], batch_per_process=1))
    one = source[1](healthy, x[:1]) if source[0] == "export" else model  # a program exported for batch 1
    found = diagnose(one, x[:1])  # a training-mode forward on one example fails in torch
    assert [(f.check, f.layer) for f in found if f.severity == "error"] == [("batch_of_one", "")]
    assert "more than 1 value per channel" in found[0].evidence


def test_gamma_collapsed_and_saturated_channels(healthy, data, source):
    model = copy.deepcopy(healthy)
    with torch.no_grad():
        model[1].weight[:3] = 1e-5
        model[4].bias[:2] = 10 * model[4].weight[:2].abs() + 1
    found = diagnose(source[1](model, data[0][:64]), data[0][:64])
    g = [f for f in found if f.check == "gamma_collapsed"]
    s = [f for f in found if f.check == "saturated_channels"]
    assert [f.layer for f in g] == ["1"] and g[0].evidence.startswith("3/32")
    assert [f.layer for f in s] == ["4"] and s[0].evidence.startswith("2/32")


def test_dead_channels(healthy, data, source):
    model = copy.deepcopy(healthy)
    with torch.no_grad():
        model[3].weight[:4] = 0.0  # the inputs of channels 0-3 of BN '4' are constant
    f = [f for f in diagnose(source[1](model, data[0][:64]), data[0][:64]) if f.check == "dead_channels"]
    assert [x.layer for x in f] == ["4"] and f[0].evidence.startswith("4/32")


def test_bias_before_bn(data, source):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10),
                          nn.BatchNorm1d(10, affine=False))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 1, 8, 8))
    x = data[0][:32].reshape(32, 1, 8, 8)
    found = diagnose(source[1](model.eval(), x), x)
    bias = [f for f in found if f.check == "bias_before_bn"]
    assert [f.layer for f in bias] == ["0", "4"] and "'0' has a bias and feeds '1' directly" in bias[0].evidence


def test_a_model_without_bn_is_a_clear_error(source):
    with pytest.raises(ConfigError, match="no BatchNorm"):
        diagnose(source[1](nn.Linear(3, 2), torch.randn(4, 3)), torch.randn(4, 3))


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_cli_on_a_user_model_and_a_crafted_checkpoint(tmp_path, monkeypatch, capsys, healthy):
    from bnlab.cli import main

    (tmp_path / "usermodels.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, momentum=0.99), nn.ReLU(),\n"
        "                         nn.Linear(32, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["doctor", "--model", "usermodels:build", "--data", "digits", "--batch-size", "64", "--html",
                 str(tmp_path / "doctor.html")])
    out = capsys.readouterr().out
    assert code == 1 and "statistics_never_updated 2" in out and "keras_momentum 2" in out  # errors: rc 1
    assert "data: digits from" in out
    assert "bias_before_bn 1" in out and out.index("[ERROR") < out.index("[WARNING") < out.index("[INFO")
    page = (tmp_path / "doctor.html").read_text()
    assert "<code>keras_momentum</code>" in page and "momentum=0.01" in page and "usermodels:build" in page
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page  # self-contained
    # weights: a state_dict loads; a file that would run code on load is refused and runs nothing
    import torch
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                             nn.Linear(32, 10)).state_dict(),
               tmp_path / "ok.pt")
    assert main(["doctor", "--model", "usermodels:build", "--weights", str(tmp_path / "ok.pt"), "--data",
                 "digits"]) == 1  # still never-updated statistics: an ERROR finding
    (tmp_path / "usermodels2.py").write_text("def build(width):\n    pass\n")
    assert main(["doctor", "--model", "usermodels2:build", "--data", "digits"]) == 2
    assert "takes no argument" in capsys.readouterr().err
    marker = tmp_path / "marker"
    torch.save({"state_dict": _Payload(marker)}, tmp_path / "evil.pt")
    code = main(["doctor", "--model", "usermodels:build", "--weights", str(tmp_path / "evil.pt"), "--data", "digits"])
    err = capsys.readouterr().err
    assert code == 2 and "refused" in err and "nothing was executed" in err and not marker.exists()


class _Branchy(nn.Module):
    """A BN called inside an if: in TorchScript its input cannot be measured (a nested block)."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(64, 8, bias=False), nn.BatchNorm1d(8)

    def forward(self, x):
        h = self.lin(x)
        if h.shape[0] > 0:
            h = self.bn(h)
        return h


def test_what_cannot_be_checked_on_a_file_is_named_with_the_reason(data, tmp_path):
    model = _Branchy()
    with torch.no_grad():  # running statistics of this data (momentum=None: the cumulative average)
        model.bn.momentum = None
        model(data[0][:512])
    model.bn.momentum = 0.1
    model.eval()
    found = diagnose(_saved(model, "script", None, tmp_path), data[0][:64])
    skipped = {f.check for f in found if f.evidence.startswith("not checked: ")}
    assert skipped == {"stale_running_stats", "dead_channels", "tiny_batch", "batch_of_one"}
    assert all(f.severity == "info" and f.layer == "bn" and "control flow" in f.evidence for f in found)
    assert diagnose(model, data[0][:64]) == []  # the Python module: every check ran, nothing found


def test_the_api_takes_a_program_module_and_refuses_other_objects(healthy, data, tmp_path):
    ep = _saved(healthy, "export", data[0][:64], tmp_path)
    before = _state(ep)
    model = copy.deepcopy(healthy)
    with torch.no_grad():
        model[1].weight[:3] = 1e-5
    sick = _saved(model, "export", data[0][:64], tmp_path).module()  # ep.module(): BN are graph calls
    assert ("gamma_collapsed", "1") in _checks(diagnose(sick, data[0][:64]))
    assert diagnose(ep.module(), data[0][:64]) == [] and diagnose(ep, data[0][:64]) == []
    _unchanged(before, ep)
    with pytest.raises(ConfigError, match="give a torch.nn.Module, a TorchScript module"):
        diagnose(str(tmp_path / "model.pt2"), data[0][:64])
    with pytest.raises(ConfigError, match="no such file"):
        load_model_file(tmp_path / "missing.pt2")
    torch.save(healthy.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ConfigError, match="refused, a torch.save file .* nothing was loaded"):
        load_model_file(tmp_path / "state.pt")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="neither a TorchScript nor a torch.export archive"):
        load_model_file(tmp_path / "notes.txt")


def _flat_net(momentum=0.1):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, momentum=momentum), nn.ReLU(),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("kind", ["script", "trace", "export"])
def test_cli_on_a_model_file(tmp_path, capsys, kind):
    from bnlab.cli import main

    path = tmp_path / f"model.{'pt2' if kind == 'export' else 'pt'}"
    model = _saved(_flat_net(momentum=0.99).eval(), kind, torch.randn(8, 1, 8, 8), tmp_path)
    (torch.export.save if kind == "export" else torch.jit.save)(model, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    code = main(["doctor", "--model", str(path), "--data", "digits", "--batch-size", "64", "--html",
                 str(tmp_path / "doctor.html")])
    out = capsys.readouterr().out
    assert code == 1 and "statistics_never_updated 2" in out and "keras_momentum 2" in out  # errors: rc 1
    assert "bias_before_bn 1" in out and out.index("[ERROR") < out.index("[WARNING") < out.index("[INFO")
    page = (tmp_path / "doctor.html").read_text()
    label = "torch.export program" if kind == "export" else "TorchScript"
    assert f"model.{'pt2' if kind == 'export' else 'pt'} ({label})" in page and "<code>keras_momentum</code>" in page
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    # options that do not apply to a file: one clear error each
    assert main(["doctor", "--model", str(path), "--weights", str(path), "--data", "digits"]) == 2
    assert "--weights goes with --model module:factory" in capsys.readouterr().err
    assert main(["doctor", "--model", str(path), "--train-mode", "--data", "digits"]) == 2
    assert "mode it was saved in" in capsys.readouterr().err
    # data the model cannot run on: 8x8 images into a model for 7x7 ones
    small = _saved(nn.Sequential(nn.Flatten(), nn.Linear(49, 4), nn.BatchNorm1d(4)).eval(), kind,
                   torch.randn(8, 1, 7, 7), tmp_path)
    (torch.export.save if kind == "export" else torch.jit.save)(small, str(tmp_path / "small.bin"))
    assert main(["doctor", "--model", str(tmp_path / "small.bin"), "--data", "digits"]) == 2
    assert "could not run on --data's inputs of shape (256, 1, 8, 8)" in capsys.readouterr().err


def _plant_pickle(src, dst, obj):
    """Copy the .pt2 ``src`` to ``dst`` with its first weight stored as a pickle of ``obj`` (marked
    use_pickle in the archive's weights config, as torch.export.save does for some tensors)."""
    import io
    import json
    import zipfile

    with zipfile.ZipFile(src) as zin:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
    cfg_name = next(i.filename for i, _ in items if i.filename.endswith("model_weights_config.json"))
    cfg = json.loads(dict((i.filename, d) for i, d in items)[cfg_name])
    first = next(iter(cfg["config"].values()))
    first["use_pickle"] = True
    buf = io.BytesIO()
    torch.save(obj, buf)
    target = cfg_name.rsplit("/", 1)[0] + "/" + first["path_name"]
    with zipfile.ZipFile(dst, "w") as zout:
        for i, d in items:
            zout.writestr(i, json.dumps(cfg).encode() if i.filename == cfg_name
                          else buf.getvalue() if i.filename == target else d)


def test_cli_refuses_missing_wrong_and_crafted_model_files(tmp_path, capsys):
    from bnlab.cli import main

    assert main(["doctor", "--model", str(tmp_path / "gone.pt2"), "--data", "digits"]) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save(_flat_net().state_dict(), tmp_path / "state.pt")
    assert main(["doctor", "--model", str(tmp_path / "state.pt"), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "refused, a torch.save file" in err and "module:factory (with --weights" in err
    marker = tmp_path / "marker"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    assert main(["doctor", "--model", str(tmp_path / "evil.pt"), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "nothing was loaded" in err and not marker.exists()
    # a .pt2 whose weight is a pickle that runs code: torch.export.load would unpickle it with
    # weights_only=False (it runs the payload); the doctor refuses the file first
    torch.export.save(torch.export.export(_flat_net().eval(), (torch.randn(8, 1, 8, 8),)), tmp_path / "ok.pt2")
    _plant_pickle(tmp_path / "ok.pt2", tmp_path / "evil.pt2", _Payload(marker))
    assert main(["doctor", "--model", str(tmp_path / "evil.pt2"), "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "nothing was executed" in err and not marker.exists()
    # a program exported for one batch size: the error says how to fix it
    torch.export.save(torch.export.export(_flat_net().eval(), (torch.randn(8, 1, 8, 8),)), tmp_path / "b8.pt2")
    assert main(["doctor", "--model", str(tmp_path / "b8.pt2"), "--data", "digits", "--batch-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "only runs on batches of 8" in err and "--batch-size 8" in err and "dynamic_shapes" in err
    assert main(["doctor", "--model", str(tmp_path / "b8.pt2"), "--data", "digits", "--batch-size", "8"]) == 1
