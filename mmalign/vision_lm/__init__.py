"""vision_lm"""
