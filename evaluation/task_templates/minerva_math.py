"""MATH scoring the Minerva way (lm-eval's ``minerva_math_*`` tasks), usable offline without extras.

lm-eval's ``lm_eval/tasks/minerva_math/utils.py`` refuses to import unless ``sympy``,
``math_verify`` and ``antlr4-python3-runtime==4.11`` are installed (the ``lm-eval[math]`` extra);
this project's environment has sympy and antlr4 4.13 but no ``math_verify``, so a YAML cannot
``include`` the built-in task. This module keeps the built-in's prompt, few-shot examples and
answer extraction, copied from lm-eval 0.4.13 (MIT License, Copyright (c) 2020 EleutherAI;
the normalization itself is from appendix D of Lewkowycz et al. 2022):

- prompt ``"Problem:\\n<problem>\\n\\nSolution:"``, generation stops at ``"Problem:"``;
- the 4 fixed Minerva few-shot examples, each ending in ``Final Answer: The final answer is X.
  I hope it is correct.``;
- the prediction's answer is the text after ``Final Answer: The final answer is`` (else
  ``[invalidanswer]``), the gold answer is the solution's last ``\\boxed{}``; both go through
  ``normalize_final_answer``.

Equivalence (:data:`EQUIVALENCE`): when the built-in module imports (the extra is installed),
its ``is_equiv`` is used: identical strings, else ``sympy.simplify(parse_latex(a) -
parse_latex(b)) == 0``. Otherwise the normalized strings must be identical (the built-in's
first test), so a few answers that only sympy would equate (``0.5`` vs ``\\frac{1}{2}``) count as
wrong. The built-in's second metric, ``math_verify``, needs that package and is not reported.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("skymoe.evaluate.math")

try:  # the full built-in scorer, when lm-eval's math extra is installed
    from lm_eval.tasks.minerva_math import utils as _builtin  # noqa: F401

    EQUIVALENCE = "sympy"
except (ImportError, AssertionError):
    _builtin = None
    EQUIVALENCE = "string"

INVALID_ANSWER = "[invalidanswer]"


def doc_to_text(doc: dict) -> str:
    return "Problem:" + "\n" + doc["problem"] + "\n\n" + "Solution:"


def gold_answer(solution: str) -> str | None:
    """The normalized content of a solution's last ``\\boxed{}`` (None when there is none)."""
    boxed = last_boxed_only_string(solution)
    if boxed is None:
        return None
    try:
        return normalize_final_answer(remove_boxed(boxed))
    except AssertionError:
        return None


def list_fewshot_samples() -> list[dict]:
    return [
        {
            "problem": "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
            "solution": "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
            "few_shot": "1",
        },
        {
            "problem": "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
            "solution": "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
            "few_shot": "1",
        },
        {
            "problem": "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
            "solution": "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.",
            "few_shot": "1",
        },
        {
            "problem": "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
            "solution": "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
            "few_shot": "1",
        },
    ]


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """``{"exact_match": 0 or 1}`` for one generation (``doc["answer"]`` is the normalized gold)."""
    answer = normalize_final_answer(get_unnormalized_answer(results[0]))
    return {"exact_match": int(is_equiv(answer, doc["answer"]))}


def is_equiv(x1: str, x2: str) -> bool:
    if _builtin is not None:
        return bool(_builtin.is_equiv(x1, x2))
    return bool(x1) and x1 != INVALID_ANSWER and x1 == x2


def get_unnormalized_answer(text: str) -> str:
    end_seq = "I hope it is correct."
    text += end_seq
    match = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.", text)
    return match.group(1).strip() if match else INVALID_ANSWER


def last_boxed_only_string(string: str) -> str | None:
    idx = string.rfind("\\boxed")
    if "\\boxed " in string:
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    if idx < 0:
        idx = string.rfind("\\fbox")
        if idx < 0:
            return None
    i = idx
    right_brace_idx = None
    num_left_braces_open = 0
    while i < len(string):
        if string[i] == "{":
            num_left_braces_open += 1
        if string[i] == "}":
            num_left_braces_open -= 1
            if num_left_braces_open == 0:
                right_brace_idx = i
                break
        i += 1
    return None if right_brace_idx is None else string[idx : right_brace_idx + 1]


def remove_boxed(s: str) -> str:
    if "\\boxed " in s:
        left = "\\boxed "
        assert s[: len(left)] == left
        return s[len(left) :]
    left = "\\boxed{"
    assert s[: len(left)] == left
    assert s[-1] == "}"
    return s[len(left) : -1]


SUBSTITUTIONS = [
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
    "\\dots",
]


def normalize_final_answer(final_answer: str) -> str:
    """Normalize a final answer to a quantitative reasoning question (lm-eval 0.4.13's version of
    Lewkowycz et al. 2022, appendix D)."""
    if _builtin is not None:
        return _builtin.normalize_final_answer(final_answer)
    final_answer = final_answer.split("=")[-1]
    for expr in REMOVED_EXPRESSIONS:
        if expr.isalpha():
            final_answer = re.sub(rf"(?<!\\)\b{expr}\b", "", final_answer)
    for before, after in SUBSTITUTIONS:
        final_answer = final_answer.replace(before, after)
    for expr in REMOVED_EXPRESSIONS:
        if expr.isalpha():
            segments = re.split(r"(\\[a-zA-Z]+)", final_answer)
            for i in range(0, len(segments), 2):
                segments[i] = segments[i].replace(expr, "")
            final_answer = "".join(segments)
        else:
            final_answer = final_answer.replace(expr, "")
    final_answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", final_answer)
    final_answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", final_answer)
    final_answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", final_answer)
    final_answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", final_answer)
    final_answer = final_answer.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", final_answer):
        final_answer = final_answer.replace(",", "")
    return final_answer
