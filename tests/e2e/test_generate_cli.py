"""experiments/generate.py: restores a run and prints the continuation of a prompt."""

import pytest

from conftest import experiment_module, run_main, tiny_config_dict
from sparsejax.train.config import parse_config
from sparsejax.train.generate import generate_text
from sparsejax.train.trainer import train


@pytest.mark.slow
def test_generate_cli_continues_the_prompt_with_the_trained_model(tmp_path, capsys):
  result = train(parse_config(tiny_config_dict(train=dict(num_steps=3))), str(tmp_path))
  variables = {"params": result.state.params, **result.state.model_state}
  with experiment_module("generate") as cli:
    for prompt, n in [("def f", 12), ("", 7), ("x", 0)]:
      capsys.readouterr()
      run_main(cli, ["generate", f"--workdir={tmp_path}", f"--prompt={prompt}",
                     f"--max_new_tokens={n}", "--temperature=0"])
      want = generate_text(result.trainer.model, variables, prompt, max_new_tokens=n,
                           temperature=0.0)
      assert capsys.readouterr().out == want + "\n"
    capsys.readouterr()
    run_main(cli, ["generate", f"--workdir={tmp_path}", "--max_new_tokens=20",
                   "--temperature=1.0", "--seed=3"])
    sampled = capsys.readouterr().out
    assert sampled == generate_text(result.trainer.model, variables, "def ",
                                    max_new_tokens=20, temperature=1.0, seed=3) + "\n"
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
      run_main(cli, ["generate", f"--workdir={tmp_path / 'none'}"])
