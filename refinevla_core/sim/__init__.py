"""Simulators behind one interface (ManiSkill3 on CPU, SimplerEnv when installed), scripted experts, instructions."""
