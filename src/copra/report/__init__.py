"""The paper's results: the reproduce suite and its timing probe, verdicts, figures, the Markdown/HTML report."""
