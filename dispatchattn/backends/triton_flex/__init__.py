"""The in-house Triton flex kernel (backend name "triton_flex")."""
