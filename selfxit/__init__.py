"""selfxit: make a frozen pretrained classifier answer early for easy inputs, label-free."""
from selfxit.api import EarlyExitModel, FitReport, load, wrap
from selfxit.fit.distill import DistillConfig
from selfxit.core.runtime import FINAL, EarlyExitOutput, SampleResult

__all__ = ["wrap", "load", "EarlyExitModel", "FitReport", "DistillConfig", "EarlyExitOutput", "SampleResult", "FINAL"]
__version__ = "0.1.0"
