"""refinevla_core — the ROS-free half of refinevla: annotation, data, model, training, inference, attention, sim, eval.

Usable from a notebook or a training server without ROS. It never imports the ROS client library nor names the ROS
package: the ROS adapters live in that package, which adds its commands, benchmarks, evaluation backend and demo
lanes through entry points (refinevla_core.plugins).
"""

__version__ = "0.1.0"
