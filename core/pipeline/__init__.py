"""Running the stages: each stage's function, stages.json, the ownership checks, run.json and --dry-run, the out_dir lock, [run] preconds comparisons."""
