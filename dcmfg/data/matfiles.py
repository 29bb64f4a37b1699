"""Reading MATLAB .mat files of both kinds peer code ships: v5 (scipy) and v7.3 (HDF5, h5py).

h5py sees a MATLAB array with its axes reversed, so every array here is returned in MATLAB's axis order
(v7.3 arrays are transposed back), and callers find the item axis by matching the item count N rather than
trusting a position. Image arrays in v7.3 files are large (20,015 x 3 x 224 x 224 is 3 GB): they stay on disk
behind `H5ImageArray`, which reads the rows asked for and returns them as N x H x W x 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import CrossModalDataset, DatasetError, LayoutError
from .textfiles import not_utf8


def is_hdf5(path) -> bool:
    import h5py

    return bool(h5py.is_hdf5(str(path)))


def _open_error(path: Path, exc: Exception) -> DatasetError:
    return DatasetError(f"{path}: cannot read as a MATLAB .mat file (v5 or v7.3): {exc}")


def mat_keys(path) -> dict[str, tuple[int, ...]]:
    """Variable name -> shape in MATLAB axis order, without loading the data."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    if is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: tuple(reversed(f[k].shape)) for k in f.keys() if not k.startswith("#") and hasattr(f[k], "shape")}
    from scipy.io import whosmat

    try:
        return {name: tuple(shape) for name, shape, _ in whosmat(str(path))}
    except Exception as exc:  # scipy raises several types for a non-.mat file
        raise _open_error(path, exc) from None


def find_key(path, candidates: Sequence[str]) -> str | None:
    """The first of `candidates` (case-insensitive) that the file holds."""
    keys = {k.lower(): k for k in mat_keys(path)}
    for c in candidates:
        if c.lower() in keys:
            return keys[c.lower()]
    return None


def read_array(path, key: str) -> np.ndarray:
    """A whole variable as a numpy array in MATLAB axis order."""
    path = Path(path)
    if is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as f:
            if key not in f:
                raise DatasetError(f"{path}: no variable {key!r} (has: {', '.join(k for k in f.keys() if not k.startswith('#'))})")
            return np.asarray(f[key][()]).T
    from scipy.io import loadmat

    try:
        data = loadmat(str(path), variable_names=[key])
    except Exception as exc:
        raise _open_error(path, exc) from None
    if key not in data:
        raise DatasetError(f"{path}: no variable {key!r} (has: {', '.join(mat_keys(path))})")
    return np.asarray(data[key])


def items_first(arr: np.ndarray, n_cols: int | None, path, key: str) -> np.ndarray:
    """A 2-D (items x columns) matrix whichever way it was stored: the column axis is the one of length n_cols."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DatasetError(f"{path}: {key} has shape {arr.shape}, expected a 2-D items x columns matrix")
    if n_cols is None or arr.shape[1] == n_cols:
        return arr
    if arr.shape[0] == n_cols:
        return arr.T
    raise DatasetError(f"{path}: {key} has shape {arr.shape}, expected one axis of length {n_cols}")


def match_items(arr: np.ndarray, n: int, path, key: str) -> np.ndarray:
    """A 2-D matrix with its item axis (length n) first."""
    arr = np.asarray(arr)
    if arr.ndim == 2 and arr.shape[0] == n:
        return arr
    if arr.ndim == 2 and arr.shape[1] == n:
        return arr.T
    raise DatasetError(f"{path}: {key} has shape {arr.shape}, but the labels say there are {n} items")


def read_strings(path, key: str) -> list[str]:
    """A cell array of strings or a char matrix (e.g. FAll file names, imgList21) as a list of str."""
    path = Path(path)
    if is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as f:
            ds = f[key]
            if ds.dtype == object or h5py.check_dtype(ref=ds.dtype) is not None:  # cell array: references
                refs = np.asarray(ds[()]).ravel(order="F")
                return ["".join(map(chr, np.asarray(f[r][()]).ravel(order="F"))).strip("\x00 ") for r in refs]
            chars = np.asarray(ds[()]).T  # char matrix, MATLAB order: rows are strings
            if chars.ndim == 1:
                chars = chars[None]
            return ["".join(map(chr, row)).strip("\x00 ") for row in chars]
    arr = read_array(path, key)
    if arr.dtype.kind in "US":  # char matrix
        return [str(s).strip() for s in arr.ravel()]
    out = []
    for cell in arr.ravel(order="F"):
        cell = np.asarray(cell).ravel()
        out.append(str(cell[0]).strip() if cell.size else "")
    return out


def _image_axes(shape: Sequence[int], n: int, path, key: str) -> list[int]:
    """Axis order (in MATLAB order) that gives N x H x W x 3: N is the axis of length n, 3 the channel axis."""
    if len(shape) != 4:
        raise DatasetError(f"{path}: {key} has shape {tuple(shape)}, expected 4-D images (N, 3 channels, H, W in some order)")
    n_axes = [a for a in range(4) if shape[a] == n]
    if not n_axes:
        raise DatasetError(f"{path}: {key} has shape {tuple(shape)}, but the labels say there are {n} items")
    n_axis = 3 if 3 in n_axes else n_axes[0]  # MATLAB stores items last; numpy-made files first
    c_axes = [a for a in range(4) if a != n_axis and shape[a] == 3]
    if not c_axes:
        raise DatasetError(f"{path}: {key} has shape {tuple(shape)}: no axis of 3 colour channels")
    c_axis = c_axes[-1] if n_axis == 3 else c_axes[0]
    rest = [a for a in range(4) if a not in (n_axis, c_axis)]
    return [n_axis, *rest, c_axis]


class H5ImageArray:
    """An N x H x W x 3 uint8 view of an image variable in a v7.3 file, read row by row on demand.

    It keeps only the path and key (the file is reopened per process), so it can be pickled to DataLoader workers.
    `take_rows(idx)` gives a view of some rows (what `CrossModalDataset.subset` uses) without reading pixels.
    """

    def __init__(self, path, key: str, n: int, rows: np.ndarray | None = None):
        import h5py

        self.path, self.key = Path(path), key
        with h5py.File(self.path, "r") as f:
            h5_shape = f[key].shape
            self.dtype = f[key].dtype
        matlab_shape = tuple(reversed(h5_shape))
        axes = _image_axes(matlab_shape, n, self.path, key)
        self._h5_axes = [len(h5_shape) - 1 - a for a in axes]  # MATLAB axis k is h5 axis ndim-1-k
        full = tuple(matlab_shape[a] for a in axes)
        self.rows = np.arange(full[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *full[1:])
        self.ndim = 4
        self._file = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _dataset(self):
        import h5py

        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[self.key]

    def _read(self, rows: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing, distinct indices
        sel = [slice(None)] * 4
        sel[self._h5_axes[0]] = uniq.tolist()
        block = np.asarray(self._dataset()[tuple(sel)])
        return np.transpose(block, self._h5_axes)[inverse.reshape(-1)]

    def take_rows(self, idx) -> "H5ImageArray":
        view = H5ImageArray.__new__(H5ImageArray)
        view.__dict__.update(self.__getstate__())
        view.rows = self.rows[np.asarray(idx, dtype=np.int64)]
        view.shape = (len(view.rows), *self.shape[1:])
        return view

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            return self._read(self.rows[[int(i)]])[0]
        return self._read(self.rows[i])

    def __array__(self, dtype=None, copy=None):
        arr = self._read(self.rows)
        return arr if dtype is None else arr.astype(dtype)


def read_images(path, key: str, n: int):
    """Images as N x H x W x 3: lazy (H5ImageArray) for v7.3, an in-memory array for v5."""
    path = Path(path)
    if is_hdf5(path):
        return H5ImageArray(path, key, n)
    arr = read_array(path, key)
    return np.ascontiguousarray(np.transpose(arr, _image_axes(arr.shape, n, path, key)))


def read_word_list(path) -> list[str]:
    """Words of a tag vocabulary, one per bag-of-tags column, in column order.

    Accepts `<tag>` or `<tag> <count>` lines (common_tags.txt, TagList.txt, TagList1k.txt) and a .tsv with a header
    holding a `tag` column (a column -> tag mapping, ordered by its first column).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: word list not found") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if path.suffix.lower() == ".tsv":
        header = lines[0].split("\t")
        if "tag" not in header:
            raise DatasetError(f"{path}: a .tsv word list needs a header with a 'tag' column, got {header}")
        col = header.index("tag")
        rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
        for k, row in enumerate(rows, start=2):
            if len(row) <= col:
                raise DatasetError(f"{path}:{k}: malformed line {lines[k - 1]!r}")
        return [row[col].strip() for row in rows]
    return [ln.split()[0] for ln in lines if ln.strip()]


def bag_to_texts(bag: np.ndarray, words: Sequence[str], path, key: str) -> list[str]:
    """Texts from a bag-of-tags matrix: the words of the columns set, in column order (the file keeps no order)."""
    if bag.shape[1] != len(words):
        raise DatasetError(f"{path}: {key} has {bag.shape[1]} tag columns but the word list has {len(words)} words")
    words_arr = np.asarray(words, dtype=object)
    nz = bag != 0
    return [" ".join(words_arr[row]) for row in nz]


def find_word_list(folder: Path, names: Sequence[str], word_list=None) -> Path | None:
    """The word list naming a bag-of-tags matrix's columns: `word_list`, or a known file name beside the .mat."""
    if word_list is not None:
        return Path(word_list)
    for d in (folder, folder.parent):
        for name in names:
            for p in (d / name, d / "doc" / name, d / "mirflickr" / "doc" / name, d / "NUS_WID_Tags" / name):
                if p.is_file():
                    return p
    return None


def load_mat_set(
    *,
    name: str,
    root: Path,
    layout: str,
    tags: tuple[Path, str],
    labels: tuple[Path, str],
    label_names: list[str],
    images: tuple[Path, str] | None,
    names: tuple[Path, str] | None,
    word_list,
    word_names: Sequence[str],
    word_hint: str,
    image_paths_from: tuple[Path, str] | None = None,
    image_root=None,
) -> CrossModalDataset:
    """A dataset from .mat files (labels, bag of tags, images or image paths): the labels fix N, the rest is matched.

    A bag-of-tags matrix without a word list cannot become text for a text encoder: that is refused, naming the
    file to add. Images come from an image variable (lazy for v7.3) or from a list of paths under `image_root`.
    """
    lab = items_first(read_array(*labels), len(label_names), *labels)
    n = lab.shape[0]
    words_path = find_word_list(Path(tags[0]).parent, word_names, word_list)
    if words_path is None:
        raise LayoutError(
            f"{tags[0]}: {tags[1]} holds only bag-of-tags vectors and no word list, so its text cannot feed a text "
            f"encoder: add the word list, one tag a line in {tags[1]}'s column order ({word_hint}), beside it, "
            "or pass word_list=PATH"
        )
    bag = match_items(read_array(*tags), n, *tags)
    texts = bag_to_texts(bag, read_word_list(words_path), *tags)
    ids = [f"row{i}" for i in range(n)]
    image_array, image_paths = None, None
    if images is not None:
        image_array = read_images(*images, n)
    else:
        rel = [s.replace("\\", "/") for s in read_strings(*image_paths_from)]
        if len(rel) != n:
            raise DatasetError(f"{image_paths_from[0]}: {len(rel)} image names but the labels have {n} rows")
        base = Path(image_root) if image_root is not None else Path(root)
        image_paths = [base / r for r in rel]
        ids = [str(Path(r).with_suffix("")) for r in rel]
    if names is not None:
        file_names = read_strings(*names)
        if len(file_names) != n:
            raise DatasetError(f"{names[0]}: {names[1]} has {len(file_names)} names but the labels have {n} rows")
        ids = [Path(s.replace("\\", "/")).stem for s in file_names]
    return CrossModalDataset(
        name=name,
        root=Path(root),
        layout=layout,
        ids=ids,
        texts=texts,
        labels=lab,
        label_names=list(label_names),
        image_array=image_array,
        image_paths=image_paths,
        stats={
            "rows": n,
            "empty_text": sum(1 for t in texts if not t),
            "word_list": str(words_path),
            "image_storage": type(image_array).__name__ if image_array is not None else "files",
        },
    )
