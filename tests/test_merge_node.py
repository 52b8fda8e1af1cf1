"""The merge node reads the method table and passes the new inputs to core.merge."""
from tests.test_nodes_unit import pack

from core.synthetic import random_lora


def test_node_lists_the_method_table_and_parses_block_weights():
    node = pack("nodes.merge")
    table = pack("core.merge").TABLE
    spec = node.GrassmannLoRAKarcherMerge.INPUT_TYPES()
    methods, opts = spec["required"]["method"]
    assert methods == list(table) and all(m.description in opts["tooltip"] for m in table.values())
    for key in ("space", "tsv_keep", "rank_auto", "energy", "block_weights", "normalise"):
        assert key in spec["optional"]
    assert node.block_specs("", 2) is None
    assert node.block_specs("INS\n-", 3) == ["INS", None, None]
    assert node.merge_rank("linear", 8) is None and node.merge_rank("tsv", 8) == 8


def test_node_report_shows_the_advice():
    merge = pack("core.merge").merge
    a = random_lora("sd1", rank=4, seed=1, limit=3)
    b = random_lora("sd1", rank=4, seed=2, limit=3)
    report = merge([a, b], [1, 1], method="tsv", rank=4).report
    tables = pack("nodes.merge").fidelity_tables(report)
    assert any("advice" in str(t) and "linear" in str(t) for t in tables)
