"""lorelay pipelines: the runner that chains stages, the CLI, Hub publishing and reports."""
