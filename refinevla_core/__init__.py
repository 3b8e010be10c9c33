"""refinevla_core — the ROS-free half of refinevla: annotation, data, model, training, inference, attention, sim, eval.

Usable from a notebook or a training server without ROS. It must never import rclpy: the ROS adapters live in
refinevla_ros.
"""

__version__ = "0.1.0"
