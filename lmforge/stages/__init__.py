"""lmforge.stages"""
