"""After Ctrl-C, `megapairs demo` repeats the interrupted run's last step messages."""

import dagster as dg

from megapairs_assets.cli.demo import last_run_messages


@dg.asset
def interrupted_training(context: dg.AssetExecutionContext) -> None:
    for step in range(1, 5):
        context.log.info(f"step {step} of 60")
    context.log.info("interrupted after step 4 of 60; its state is saved in /x: run it again")
    raise dg.Failure("stopped on request")


def test_last_run_messages_are_the_steps_own_last_lines() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        result = dg.materialize([interrupted_training], instance=instance, raise_on_error=False)
        assert not result.success
        lines = last_run_messages(instance, result.run_id, count=2)
    assert lines == [
        "interrupted_training: step 4 of 60",
        "interrupted_training: interrupted after step 4 of 60; its state is saved in /x: run it "
        "again",
    ]
