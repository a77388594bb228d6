"""The cascade: the distilled student answers first, the teacher only where the student is unsure.

``Cascade(student, teacher, threshold=0.9)`` from Python; ``calibrate_run(run_dir)`` (``softkd
cascade``) chooses the threshold on a run's validation split and measures it on the test split;
``export_cascade`` / ``load_cascade`` deploy it with onnxruntime.
"""

from softkd.cascade.calibrate import calibrate_run
from softkd.cascade.model import CONFIDENCES, Cascade, CascadeOutput, cascade_curve, combine, confidence, pick_point
from softkd.cascade.onnx import OnnxCascade, export_cascade, load_cascade

__all__ = ["CONFIDENCES", "Cascade", "CascadeOutput", "OnnxCascade", "calibrate_run", "cascade_curve", "combine",
           "confidence", "export_cascade", "load_cascade", "pick_point"]
