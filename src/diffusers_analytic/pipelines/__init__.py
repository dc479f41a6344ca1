from .pipeline_analytic_ddim import AnalyticDDIMPipeline, AnalyticPipelineOutput

__all__ = ["AnalyticDDIMPipeline", "AnalyticPipelineOutput"]
