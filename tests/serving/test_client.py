"""`cascade recommend --server/--rest` against `cascade serve` over a real export: the same answers
as the SavedModel loaded in process."""

from __future__ import annotations

import json

import pytest

from serving import cli
from serving.model_server import server
from serving.model_server import config as server_config


@pytest.fixture(scope="module")
def running(tiny_export):
    options = server.ServerOptions(server_config.config_for_base_path(tiny_export), port=0,
                                   rest_api_port=0)
    with server.Server(options).start() as started:
        yield started


def _recommend(capsys, *flags) -> dict:
    assert cli.main(["recommend", "--user", "1", "--user", "nobody", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_grpc_and_rest_match_the_in_process_answer(running, tiny_export, tiny_data_dir, capsys):
    local = _recommend(capsys, "--model-base-path", str(tiny_export))
    grpc_answer = _recommend(capsys, "--server", f"127.0.0.1:{running.grpc_port}", "--wait", "30",
                             "--data", str(tiny_data_dir))
    rest_answer = _recommend(capsys, "--rest", f"http://127.0.0.1:{running.rest_port}",
                             "--data", str(tiny_data_dir))
    for answer in (grpc_answer, rest_answer):
        assert [r["item_id"] for r in answer["1"]] == [r["item_id"] for r in local["1"]]
        assert [r["title"] for r in answer["nobody"]] == [r["title"] for r in local["nobody"]]
        assert answer["1"][0]["score"] == pytest.approx(local["1"][0]["score"], abs=1e-5)


def test_unknown_model_is_a_clean_error(running, capsys):
    assert cli.main(["recommend", "--user", "1", "--server", f"127.0.0.1:{running.grpc_port}",
                     "--model", "no_such_model"]) == 1
    assert cli.main(["recommend", "--user", "1", "--rest", f"http://127.0.0.1:{running.rest_port}",
                     "--model", "no_such_model"]) == 1
