"""robotics"""
