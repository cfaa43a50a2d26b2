"""Students: any timm backbone with a linear projection to the teacher's embedding (or a class head)."""

from .losses import EMBEDDING_LOSSES, embedding_loss, label_loss
from .model import Student, StudentConfig, load_student, save_student, student_transform

__all__ = ["EMBEDDING_LOSSES", "Student", "StudentConfig", "embedding_loss", "label_loss", "load_student",
           "save_student", "student_transform"]
