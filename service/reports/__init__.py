"""Reports of finished jobs for people (HTML); the JSON report is the job's result itself."""

from service.reports.html import render_report_html

__all__ = ["render_report_html"]
