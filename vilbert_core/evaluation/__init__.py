"""Evaluation of ViLBERT models: the tasks' official metrics, reports, plots and attention pictures.

- `metrics`: pure metric functions (VQA, VCR, RefCOCO, retrieval, pretraining), no model, no files.
- `evaluator`: `run_eval(task, model, data, out, ...)` behind `vilbert-data eval`.
- `explain`: `run_explain(model, features, image_id, text, out)` behind `vilbert-data explain`.
- `plots`: matplotlib figures for the report.
Submodules are imported explicitly so that importing the package stays cheap.
"""
