"""Closed-loop evaluation: episode runner (in-process; through ROS in refinevla_ros.sim_eval_client), Wilson
intervals, reports with plots, a SimplerEnv-style table and captioned videos."""
