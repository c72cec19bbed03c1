"""lmforge.peft"""
