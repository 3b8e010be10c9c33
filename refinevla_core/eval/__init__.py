"""Closed-loop evaluation: episode runner (in-process; through ROS in the ROS package's evaluation client), Wilson
intervals, reports with plots, a SimplerEnv-style table and captioned videos."""
