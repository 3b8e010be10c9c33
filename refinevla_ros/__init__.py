"""refinevla_ros — thin rclpy adapters around refinevla_core: message <-> core types, parameters, timers."""
