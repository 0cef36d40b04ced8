"""Before/after acceptance reports (recipe stage 3)."""

from nld_lora.report.runner import ReportConfig, build_report, headline

__all__ = ["ReportConfig", "build_report", "headline"]
