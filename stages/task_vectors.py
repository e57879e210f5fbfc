"""DVC stage entry point: `python stages/task_vectors.py --help` lists its paths (set in dvc.yaml)."""

from mergeflow.stage import main

if __name__ == "__main__":
    main("mergeflow.pipeline.task_vectors")
