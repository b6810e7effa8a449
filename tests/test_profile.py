import json

from typer.testing import CliRunner

from han_edge.cli import app


def test_profile_flops_json_matches_table1():
    result = CliRunner().invoke(app, ["profile", "flops", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(result.output)}
    assert set(rows) == {"small", "medium", "large"}
    for r in rows.values():
        assert r["flops"] == 2 * r["macs"]
        assert abs(r["flops"] / r["paper_flops"] - 1) < 0.05
        assert 1e6 < r["params"] < 5e6
    assert rows["small"]["flops"] < rows["medium"]["flops"] < rows["large"]["flops"]
    # Strides change cost, not parameters.
    assert rows["small"]["params"] == rows["large"]["params"]
