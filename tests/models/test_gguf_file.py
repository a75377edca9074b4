"""A GGUF checkpoint is parsed once per load, however often transformers opens it."""
from models.gguf_file import gguf_parsed_once


def test_transformers_reads_one_parse_inside_the_block(smollm2_path, monkeypatch):
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    parses = []
    parse = gguf.GGUFReader

    def counting_parse(path, mode="r"):
        parses.append(path)
        return parse(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting_parse)
    # Past the suite's memo of load_gguf_checkpoint (tests/conftest.py), to transformers' own function.
    read = getattr(hf_gguf.load_gguf_checkpoint, "__wrapped__", hf_gguf.load_gguf_checkpoint)
    bar = hf_gguf.tqdm
    with gguf_parsed_once():
        assert read(smollm2_path)["config"]["model_type"] == "llama"
        with gguf_parsed_once():  # nested: the outer block's reader
            assert read(smollm2_path)["tokenizer"]["tokens"]
    assert len(parses) == 1, "config and tokenizer reads must share one parse"
    assert gguf.GGUFReader is counting_parse and hf_gguf.tqdm is bar, "the block restores what it replaced"
