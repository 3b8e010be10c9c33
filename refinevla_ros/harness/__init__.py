"""One harness for driving the ReFineVLA ROS graph from a process, so each rule exists once:

- processes: node commands (`-p key:=value`, params files) and node processes (own session, log, SIGINT -> wait ->
  kill the group) — imports no rclpy, so light modules (benchmark argument parsers) can use it;
- session: this process's own rclpy context, node and executor on a chosen ROS domain, waiting on what arrives;
- bridge: the client that resets, drives or watches sim_bridge_node episodes, with one set of episode rules;
- graph: the evaluation graph (sim_bridge_node + policy_node processes + the client) with the shared settings.

Evaluation (`refinevla eval --via ros*`), the demo's lanes and every ROS benchmark use it. Import from the submodules
(this package imports nothing, so `processes` stays free of rclpy).
"""
