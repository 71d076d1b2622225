"""Loading a saved model and its inputs from files, for ``mistiquefs capture``.

Models: ``.keras`` (Keras' own format, loaded in safe mode) and ``.skops`` (scikit-learn, loaded with an
explicit list of trusted types). Pickles (``.pkl``, ``.joblib``) run arbitrary code when loaded, so they
are refused unless the caller says it trusts the file. Inputs: ``.npy`` (never with pickled objects; a
structured array, such as a stored ``input``, is a table) or ``.csv``, read for the model it is given to: a
header row where the model knows its columns' names, the columns its encoders were fitted on as text
(pandas when it is installed; else numpy's structured arrays); for a model that takes documents (a text
vectorizer first), one column of texts. Every row of a CSV has as many fields as its
first row: a missing value is an empty field (``4.0,,6.0``), not a short row. A word in a column of numbers
the model reads is refused naming its line (``_refuse_stray_text``), as is a CSV with text for a Keras model.
"""

from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mistiquefs.capture.base import CaptureWarning
from mistiquefs.errors import CaptureError, one_line

PICKLE_SUFFIXES = {".pkl", ".pickle", ".joblib"}


def _require_file(path: Path, what: str) -> None:
    """CaptureError unless ``path`` is a file (following links): saying whether it is missing, a
    directory, or something else (a FIFO, a socket, a device)."""
    if path.is_file():
        return
    if path.is_dir():
        raise CaptureError(f"{what} {path} is a directory, not a file")
    if path.exists():
        raise CaptureError(f"{what} {path} is not a regular file")
    raise CaptureError(f"{what} {path} does not exist")


def load_model_file(path: Path, *, trust_pickle: bool = False) -> Any:
    _require_file(path, "model file")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        from mistiquefs.capture.keras import load_model

        return load_model(path)
    if suffix == ".skops":
        from mistiquefs.capture.sklearn import load_model

        return load_model(path)
    if suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise CaptureError(
                f"{path} is a pickle, and loading a pickle runs whatever code it holds; save the pipeline "
                "with skops (skops.io.dump) or pass --trust-pickle if you made this file yourself"
            )
        import joblib

        try:
            return joblib.load(path)
        except Exception as exc:  # corrupt, truncated, not a pickle, or naming a module that is not installed
            raise CaptureError(f"cannot load the pickle {path}: {one_line(exc)}") from exc
    raise CaptureError(f"unknown model format {suffix!r}: use a .keras model or a .skops scikit-learn pipeline")


NPY_MAGIC = b"\x93NUMPY"
# pandas' default missing-value spellings (pandas._libs.parsers.STR_NA_VALUES): still missing in the columns
# a model reads as numbers, never in those it reads as text ("NA" is North America, "None" a category)
NA_SPELLINGS = ("", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
                "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null")


def load_inputs_file(path: Path, model: Any = None, *, header: bool | None = None) -> Any:
    """The inputs in ``path`` for ``model`` (the loaded model, which decides how a CSV is read; without it,
    a CSV is read by its contents alone). A ``.npy`` file is memory-mapped: a capture reads it batch by
    batch, so memory follows the batch, not the file. ``header``: whether a CSV's first row names its
    columns (None: decided from the row and the model, ``_has_header``)."""
    _require_file(path, "inputs file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _load_npy(path)
    if suffix == ".csv":
        return _load_csv(path, model, header)
    raise CaptureError(f"unknown inputs format {suffix!r}: use .npy or .csv")


def _load_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as file:
            magic = file.read(len(NPY_MAGIC))
    except OSError as exc:
        raise CaptureError(f"{path} is not a readable .npy file: {exc.strerror or exc}") from exc
    if magic != NPY_MAGIC:
        raise CaptureError(f"{path} is not a readable .npy file: it does not start as numpy.save writes one "
                           "(\\x93NUMPY)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            raise CaptureError(f"{path} holds Python objects, which mistiquefs does not load") from exc
        raise CaptureError(f"{path} is not a readable .npy file: {exc}") from exc
    except (EOFError, OSError) as exc:  # empty or truncated, or unreadable
        raise CaptureError(f"{path} is not a readable .npy file: {exc or type(exc).__name__}") from exc


def _first_row(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as file:
        return next(csv.reader(file), [])


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return bool(cell.strip())


def _has_header(path: Path, first: list[str], names: list[str] | None, text: dict[Any, set[str]],
                header: bool | None = None) -> bool:
    """Whether the first row of the CSV names its columns. For a model fitted on a DataFrame it must: it
    names the model's columns, which scikit-learn selects by name. For one fitted on an array (``text``:
    the positions it reads as text, with their categories), a header is a row of names, and an empty cell
    or one of pandas' missing-value spellings (``NA_SPELLINGS``) names nothing: it is a missing value
    (DataFrame.to_csv writes NaN as an empty cell). Deciding from the other cells, the first row is data
    where every one in the columns read as numbers is a number (np.savetxt writes no header); where there
    is none there, where a cell of a text column is one of its categories; and where no cell is left (a
    row of missing values only). A row ``0,1,...,k-1`` is a header (DataFrame.to_csv of unnamed columns
    writes it), with a warning: it may be data. ``header`` (the user's word) overrides all that, except
    that a model fitted on a DataFrame needs its column names."""
    if names is not None and header is False:
        raise CaptureError(
            f"--csv-header no: the model was fitted on a DataFrame and selects its columns by name, so the "
            f"first row of {path} must name them; give the file a header row with the model's column names "
            "(DataFrame.to_csv(index=False) writes one) and leave --csv-header at auto or yes"
        )
    if names is None and header is not None:
        return header
    if names is not None:
        missing = [name for name in names if name not in set(first)]
        if missing:
            shown = ", ".join(repr(name) for name in missing[:8]) + (", ..." if len(missing) > 8 else "")
            raise CaptureError(
                f"the first row of {path} does not name the column(s) {shown} that the model was fitted on; "
                "the CSV needs a header row with the model's column names (DataFrame.to_csv(index=False) "
                "writes one)"
            )
        return True
    if not first:
        return True
    if first == [str(i) for i in range(len(first))]:  # DataFrame.to_csv of unnamed columns
        # numbers, which the rule below would take for data: say so, as it may be (--csv-header no)
        shown = ",".join(first[:6]) + (",..." if len(first) > 6 else "")
        warnings.warn(CaptureWarning(
            f"took the first row of {path} ({shown}) for column names, as DataFrame.to_csv writes them for "
            "unnamed columns; if it is a row of data, read the file with --csv-header no"), stacklevel=4)
        return True
    numbers = [cell for i, cell in enumerate(first) if i not in text and cell not in NA_SPELLINGS]
    if numbers:
        return not all(_is_number(cell) for cell in numbers)
    texts = [(i, cell) for i, cell in enumerate(first) if i in text and cell != ""]
    if any(cell in text[i] for i, cell in texts):  # a category ("NA" may be one): data
        return False
    return any(cell not in NA_SPELLINGS for _i, cell in texts)  # a name; a row of missing values is data


def _load_csv(path: Path, model: Any, header: bool | None = None) -> Any:
    try:
        first = _first_row(path)
    except OSError as exc:
        raise CaptureError(f"{path} is not a readable CSV file: {exc.strerror or exc}") from exc
    if not first:  # (not even a header: an empty file, or blank lines only)
        raise CaptureError(f"{path} is empty: there is nothing to capture")
    if _takes_documents(model):
        return _documents_csv(path, first, header)
    _refuse_other_delimiters(path, first, model)
    names = _model_names(model)
    text = _text_columns(model)
    header = _has_header(path, first, names, text, header)
    pandas = _pandas()
    if pandas is None:
        return _csv_without_pandas(path, header, len(first))
    # columns by name where the first row names them, else by position (what pandas names them then)
    columns: list[Any] = list(first) if header else list(range(len(first)))
    if names is None and header:  # a model fitted on an array knows its text columns by position
        text = {columns[i]: values for i, values in text.items() if i < len(columns)}
    na_values = {column: [""] if column in text else list(NA_SPELLINGS) for column in columns}
    try:
        # Text columns stay text: "02134" is a zip code, not 2134, for an encoder fitted on strings; and
        # only an empty cell is missing there ("NA" is a region, "None" a category)
        frame = pandas.read_csv(path, header=0 if header else None, keep_default_na=False, na_values=na_values,
                                dtype={column: str for column in columns if column in text} or None)
    except (ValueError, pandas.errors.ParserError) as exc:
        long = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if long:  # (pandas' "Error tokenizing data. C error: ..." said as a short row is)
            what = "the header" if header else "the first row"
            raise CaptureError(f"{path} is not a readable CSV file: expected {long[1]} fields in line {long[2]}, saw "
                               f"{long[3]} ({what} has {long[1]}; a text holding a comma is quoted, as in \"a,b\")"
                               ) from exc
        raise CaptureError(f"{path} is not a readable CSV file: {one_line(exc, typed=False)}") from exc
    if len(frame.index) == 0:
        raise CaptureError(f"{path} has a header row and no rows of data: there is nothing to capture")
    if header and not isinstance(frame.index, pandas.RangeIndex):
        # every data row one field longer than the header: pandas silently takes the first column for an
        # index (and names the others one column off)
        raise CaptureError(f"{path} is not a readable CSV file: its header names {len(first)} columns and its "
                           f"rows have {len(first) + frame.index.nlevels}; name every column in the header")
    # pandas pads a row with too few fields with missing values (it refuses one with too many), which
    # then shows in the last column: only then is the file read again, to find the short row
    if len(frame.columns) > 1 and frame.iloc[:, -1].isna().any():
        _refuse_short_rows(path, len(first), header)
    if model is not None:
        read = _read_columns(model)
        if read is not None and names is None and header:  # (positions: as the text columns above)
            read = {columns[i] for i in read if isinstance(i, int) and i < len(columns)}
        numeric = [c for c in (names or frame.columns) if c not in text and (read is None or c in read)]
        _refuse_stray_text(path, frame, numeric, header, pandas)
    if names is None and (model is not None or not header):
        # a model fitted on an array gets an array, as it was fitted (a DataFrame of numbers is one too)
        dtypes = list(frame.dtypes)
        if dtypes and all(isinstance(d, np.dtype) and d.kind in "biuf" for d in dtypes):
            return frame.to_numpy(dtype=np.result_type(*dtypes))
        if _is_keras(model):
            _refuse_text_for_keras(path, frame, header)
    return frame


#: a first row that names a CSV's one column of texts: one word, as DataFrame.to_csv writes a column's name
_COLUMN_NAME = re.compile(r"[A-Za-z_][\w.-]{0,63}")
#: a first row that may name it as well, or be a short text: up to three words ("Review Text")
_SHORT_PHRASE = re.compile(r"\w+( \w+){1,2}")


def _documents_csv(path: Path, first: list[str], header: bool | None) -> list[str]:
    """The texts of a CSV of one column, one per row, for a model that takes documents (its first step is a
    text vectorizer): every field as written, none of them missing ("NA" is a text, ``""`` an empty one,
    a line of blanks one of blanks), a quoted field may span lines; only empty lines are no rows. Where
    ``header`` does not say, the first row names the column when it is one word (``text``, ``review_body``),
    with a warning (a text may be one word), and is a text otherwise, with a warning where it is a short
    phrase (a name may be several words)."""
    texts: list[str] = []
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as file:
        reader = csv.reader(file)
        line = 1
        for row in reader:
            if len(row) > 1:
                raise CaptureError(
                    f"{path}: line {line} has {len(row)} fields, and the model's first step takes one text per "
                    "example: give it a CSV of one column, the texts (a text holding a comma is quoted, as in "
                    "\"a,b\"; DataFrame.to_csv of that one column writes it so)")
            if row:
                texts.append(row[0])
            line = reader.line_num + 1
    if header is None:
        header = bool(_COLUMN_NAME.fullmatch(first[0]))
        if header or _SHORT_PHRASE.fullmatch(first[0]):
            took, other = ("the name of its column of texts", "no") if header else ("a text", "yes")
            warnings.warn(CaptureWarning(
                f"took the first row of {path} ({first[0]!r}) for {took}; if it is "
                f"{'a text' if header else 'the column name'}, read the file with --csv-header {other}"),
                stacklevel=4)
    if header:
        texts = texts[1:]
    if not texts:
        raise CaptureError(f"{path} has a header row and no texts: there is nothing to capture")
    return texts


def _refuse_other_delimiters(path: Path, first: list[str], model: Any) -> None:
    """CaptureError for a file of one field per row that holds another delimiter, where the model takes
    several columns: a semicolon- or tab-separated file (which pandas would read as one column of text)."""
    width = _input_width(model)
    if len(first) != 1 or width is None or width < 2:
        return
    for delimiter, name in ((";", "semicolon"), ("\t", "tab"), ("|", "bar")):
        if len(first[0].split(delimiter)) == width:
            raise CaptureError(
                f"{path} has one field per row, and its first row holds {width} fields separated by a {name} "
                f"({delimiter!r}): mistiquefs reads comma-separated files (the model takes {width} columns); "
                "write it with commas (DataFrame.to_csv(path, index=False), numpy.savetxt(path, X, "
                "delimiter=',')) or save the array as .npy (numpy.save)")


def _input_width(model: Any) -> int | None:
    """How many columns ``model`` takes, where it says (scikit-learn's ``n_features_in_``, a Keras model's
    last input axis of a 2-D input)."""
    width = getattr(model, "n_features_in_", None)
    if width is None and _is_keras(model):
        try:
            shape = model.input_shape
        except (AttributeError, ValueError, RuntimeError):  # (several inputs, or none built)
            return None
        width = shape[-1] if isinstance(shape, tuple) and len(shape) == 2 else None
    return int(width) if isinstance(width, (int, np.integer)) else None


def _refuse_stray_text(path: Path, frame: Any, numeric: list[Any], header: bool, pandas: Any) -> None:
    """CaptureError naming the line and field of a cell that is not a number in a column of numbers (one
    of ``numeric``, which the model reads and not as text, where the cells that are numbers outnumber
    those that are not: a column of words with a "42" in it is text): pandas reads such a column as text,
    and what the model then said of it was wrong (a text column "holds missing values" where an empty
    cell was there too, or "could not convert string to float", with no line)."""
    for column in numeric:
        values = frame[column]
        if isinstance(values.dtype, np.dtype) and values.dtype.kind in "biufcmM":
            continue
        numbers = pandas.to_numeric(values, errors="coerce")  # pandas' own number syntax, as read_csv's
        stray = values.notna() & numbers.isna()
        if not stray.any() or stray.sum() >= numbers.notna().sum():  # a column of text
            continue
        row = int(np.flatnonzero(stray.to_numpy())[0])
        line = _line_of_row(path, row + header)
        field = list(frame.columns).index(column) + 1
        named = f"column {column!r} (field {field})" if header else f"field {field}"
        more = int(stray.sum()) - 1
        others = f" ({more} more cell{'s' * (more > 1)} of it {'are' if more > 1 else 'is'} no number either)"
        raise CaptureError(
            f"{path}: line {line} has {values.iloc[row]!r} in {named}, a column of numbers the model reads as "
            f"numbers{others if more else ''}: correct that cell, or leave it empty for a missing value")


def _refuse_text_for_keras(path: Path, frame: Any, header: bool) -> None:
    """CaptureError for a CSV with text columns given to a Keras model, which takes one array of numbers."""
    columns = [column for column, dtype in frame.dtypes.items() if not (isinstance(dtype, np.dtype)
                                                                       and dtype.kind in "biuf")]
    shown = ", ".join(repr(c) if header else f"field {list(frame.columns).index(c) + 1}" for c in columns[:4])
    raise CaptureError(
        f"{path} holds text in {shown}{', ...' if len(columns) > 4 else ''}, and a Keras model takes an array "
        "of numbers: give it a CSV of numbers only (a header row is fine), or a .npy file of the array the "
        "model takes (numpy.save)")


def _is_keras(model: Any) -> bool:
    return any(klass.__module__.split(".")[0] in ("keras", "tf_keras") for klass in type(model).__mro__)


def _rows(path: Path) -> Any:
    """(line, fields) of each row of ``path``, the line it starts on counted from 1 as an editor counts
    them; blank lines (csv: [] or whitespace), which pandas skips, are no rows, and a line of only ""
    is one empty field ([''])."""
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as file:
        reader = csv.reader(file)
        line = 1
        for row in reader:
            if row and not (len(row) == 1 and row[0] != "" and not row[0].strip()):
                yield line, row
            line = reader.line_num + 1


def _line_of_row(path: Path, index: int) -> int:
    """The line row ``index`` (counted from 0, the header included) of ``path`` starts on."""
    for number, (line, _row) in enumerate(_rows(path)):
        if number == index:
            return line
    return index + 1  # (not reached: pandas read that row)


def _refuse_short_rows(path: Path, width: int, header: bool) -> None:
    """CaptureError naming the first row of ``path`` with fewer than ``width`` fields (blank lines,
    which pandas skips, are no rows). The line named is the one the row starts on, counted from 1 as an
    editor counts them (pandas' error for a row with too many fields counts rows instead, which differs
    only after a quoted field holding a line break)."""
    for line, row in _rows(path):
        if len(row) < width:
            what = "the header" if header else "the first row"
            raise CaptureError(
                f"{path} is not a readable CSV file: expected {width} fields in line {line}, saw "
                f"{len(row)} ({what} has {width}; a missing value is an empty field, as in 1.0,,3.0)")


def _pandas() -> Any:
    """pandas, or None where it is not installed (an optional dependency of scikit-learn)."""
    try:
        import pandas
    except ImportError:
        return None
    return pandas


def _model_names(model: Any) -> list[str] | None:
    names = getattr(model, "feature_names_in_", None)
    return None if names is None else [str(name) for name in names]


def _text_columns(model: Any) -> dict[Any, set[str]]:
    """The columns ``model`` reads as text (names where it knows them, else positions), with their
    categories."""
    if model is None or type(model).__module__.split(".")[0] != "sklearn":
        return {}
    from mistiquefs.capture.sklearn import text_columns

    return text_columns(model)


def _takes_documents(model: Any) -> bool:
    """Whether ``model`` takes one text per example (a scikit-learn model whose first step is a text
    vectorizer)."""
    if model is None or type(model).__module__.split(".")[0] != "sklearn":
        return False
    from mistiquefs.capture.sklearn import takes_documents

    return takes_documents(model)


def _read_columns(model: Any) -> set[Any] | None:
    """The columns ``model`` reads at all (names where it knows them, else positions); None: all."""
    if type(model).__module__.split(".")[0] != "sklearn":
        return None
    from mistiquefs.capture.sklearn import read_columns

    return read_columns(model)


def _csv_without_pandas(path: Path, header: bool, width: int) -> np.ndarray:
    """The CSV as numpy reads it (pandas is not installed): a structured array where the first row names
    the columns or where they have different types (the adapter makes numbers one 2-D array)."""
    try:
        array = np.genfromtxt(path, delimiter=",", names=True if header else None, dtype=None, encoding="utf-8")
    except ValueError as exc:  # "Some errors were detected !\n    Line #2 (got 2 columns instead of 3)"
        raise CaptureError(f"{path} is not a readable CSV file: {one_line(exc, typed=False)}") from exc
    if array.size == 0:
        raise CaptureError(f"{path} has a header row and no rows of data: there is nothing to capture")
    if array.dtype.names is None:
        return array.reshape(-1, max(width, 1))  # one row or one column reads as 1-D
    return np.atleast_1d(array)
