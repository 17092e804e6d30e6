"""Reading why models failed to load from Triton's repository index and its log (serving.server.readiness)."""

from __future__ import annotations

from serving.server.readiness import ModelLoadFailure, load_failures

# Lines as tritonserver 2.51 writes them (from a real start with a broken config and a missing backend).
LOG = "\n".join([
    'I1201 22:37:15.099133 2028 server.cc:241] "started"',
    'E1201 22:37:15.101380 2028 model_repository_manager.cc:1460] "Poll failed for model directory \'m\': model '
    'input \'x\' dimension must be integer >= 1, or -1 to indicate a variable-size dimension for m"',
    'E1201 22:37:15.101857 2028 model_repository_manager.cc:703] "Invalid argument: ensemble m_ensemble contains '
    'models that are not available or ambiguous: m"',
])


def test_nothing_is_decided_while_a_model_still_loads():
    assert load_failures([{"name": "m", "state": "LOADING"}, {"name": "n", "state": "UNAVAILABLE"}], LOG) is None


def test_ready_models_are_left_out_and_each_failure_gets_the_index_s_or_the_log_s_reason():
    index = [{"name": "m"}, {"name": "m_ensemble"}, {"name": "m_tta", "version": "1", "state": "READY"},
             {"name": "m_pre", "version": "1", "state": "UNAVAILABLE", "reason": "no backend 'dali'"}]
    assert load_failures(index, LOG) == [
        ModelLoadFailure("m", None, None, "model input 'x' dimension must be integer >= 1, or -1 to indicate a "
                                          "variable-size dimension for m"),
        ModelLoadFailure("m_ensemble", None, None, "Invalid argument: ensemble m_ensemble contains models that are "
                                                   "not available or ambiguous: m"),
        ModelLoadFailure("m_pre", "1", "UNAVAILABLE", "no backend 'dali'")]
    assert load_failures([{"name": "other"}], LOG)[0].reason == "no reason in the server's log"
    assert load_failures(index[2:3], LOG) == []
