"""Evaluation: tasks, scoring of choices and generations, and adapters to other harnesses."""
