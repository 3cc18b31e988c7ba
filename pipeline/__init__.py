"""From a recipe file to a model bundle: validation, the steps, skip/resume, and the run report."""
