"""Out-of-tree plugins: a tiny distribution, installed into a temporary directory on sys.path, declares a
platform plugin and a general plugin (registering a model architecture) as entry points; both take effect
in a fresh process (runtime/plugins.py)."""
import json
import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO_ROOT

PLUGIN_MODULE = '''
# Imports inside the functions: a platform plugin runs while runtime.platforms is still being imported.


def register():
    from models.llama import LlamaForCausalLM
    from models.registry import register_model

    class PluginLlamaForCausalLM(LlamaForCausalLM):
        """An "out-of-tree" architecture: Llama under another name."""

    register_model("PluginLlamaForCausalLM", PluginLlamaForCausalLM)


def fake_platform():
    return "tests.helpers.fake_platform:FakePlatform"


def unusable_platform():
    return None  # its device is not on this machine
'''
ENTRY_POINTS = '''
[graphmode.general_plugins]
plugin_models = graphmode_test_plugin:register

[graphmode.platform_plugins]
fake = graphmode_test_plugin:fake_platform
absent = graphmode_test_plugin:unusable_platform
'''
CHECK = textwrap.dedent('''
    import json, sys
    from models.testing import save_random_checkpoint, tiny_config
    from runtime import LLM, SamplingParams
    from runtime.platforms import current_platform
    save_random_checkpoint(tiny_config("LlamaForCausalLM"), sys.argv[1])
    with open(sys.argv[1] + "/config.json") as f:
        config = json.load(f)
    config["architectures"] = ["PluginLlamaForCausalLM"]  # a name only the plugin knows
    with open(sys.argv[1] + "/config.json", "w") as f:
        json.dump(config, f)
    llm = LLM(sys.argv[1], dtype="float32", max_num_seqs=2, max_model_len=64, num_kv_blocks=16)
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)[0]
    print(json.dumps({"platform": type(current_platform).__name__, "model": llm.engine.model_class.__name__,
                      "tokens": len(out.outputs[0].token_ids)}))
''')


def _install_plugin(site):
    (site / "graphmode_test_plugin.py").write_text(PLUGIN_MODULE)
    dist = site / "graphmode_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: graphmode-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)


def _run(tmp_path, **env):
    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site)
    full_env = {k: v for k, v in os.environ.items() if k not in ("GRAPHMODE_PLATFORM", "GRAPHMODE_PLUGINS")}
    full_env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO_ROOT)]), **env)
    return subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "ckpt")], cwd=REPO_ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_platform_and_general_plugins_take_effect(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"platform": "FakePlatform", "model": "PluginLlamaForCausalLM", "tokens": 3}
    assert "platform from plugin 'fake'" in proc.stderr and "general plugin 'plugin_models' loaded" in proc.stderr


def test_graphmode_plugins_chooses_which_load(tmp_path):
    proc = _run(tmp_path, GRAPHMODE_PLUGINS="absent")  # neither the fake platform nor the architecture
    assert proc.returncode != 0
    assert "architecture 'PluginLlamaForCausalLM' is not supported" in proc.stderr
