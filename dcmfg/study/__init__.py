"""The study: notebooks that each compute what they need, and the runner that executes them into the book.

A notebook starts with three cells:

    from dcmfg import study                     # 1. (hidden) remembers which names exist before the parameters
    _before = set(globals())
    dataset: str = "auto"  # ...                # 2. the `parameters` cell: annotated assignments (a quoted
                                                #    annotation such as "Optional[float]" needs no import)
    s = study.start(globals(), _before)         # 3. checks every parameter (name, type) before any work

and then asks `s` for what it needs: `s.load_dataset()`, `s.split_file(seed)`, `s.features()`, `s.run(model, seed)`,
`s.runs(models)`. Each is produced on demand and cached by content under the cache dir, so a notebook run alone, in
any order, with any parameters, gives the same numbers as inside the full study. No notebook reads a file that
another notebook writes.

Parameters shared by the notebooks (a notebook declares those it uses): the data (`dataset`, `data_root`,
`synthetic_n`, `synthetic_seed`), the split protocol (`split_protocol`, `query`, `val`, `train`, `seeds`), the
training budget (`epochs`, `patience`), `settings` (dotted config values for every run and for the features, e.g.
{"features.regions": 2}) and `device`.

Where each part lives:

- `params`: the parameter check at the top of each notebook, and the parameter sets (configs/study-*.yaml);
- `study`: the `Study` object (data, split files, configs, features, runs and the worker pool), `start`;
- `learningcurve`: the gain of the graph against the training size (chapter 5b);
- `display`: figures and tables as self-contained HTML, the synthetic-data banner;
- `book`: the runner, `dcmfg study run` (papermill into book/chapters/, then the Jupyter Book, offline);
- `repo`: where the checkout's configs/, notebooks/ and book/ are, and paths as the book may show them;
- the chapters' own helpers: `tables` and `stats` (numbers for tables: mean ± std, paired differences with
  Student-t intervals), `figures`, `graphstudy`, `interpret`, `scaling`, `explorer` (and its HTML views,
  `search_views`), `badinput`.
"""

from dcmfg.study.book import (NotebookRun, StudyResult, book_config, book_toc, build_book, check_offline_html,
                              rerun_commands, run_command, run_notebooks, run_study, stage_book_sources)
from dcmfg.study.display import banner_html, png_data_uri, show_figure, show_table
from dcmfg.study.params import (ParameterError, check_parameters, load_params, notebook_parameters,
                                resolve_params_path)
from dcmfg.study.repo import notebook_names, repo_dir, shown_path
from dcmfg.study.study import RUN_COST, DataChoice, Study, resolve_dataset, start

__all__ = [
    "RUN_COST", "DataChoice", "NotebookRun", "ParameterError", "Study", "StudyResult", "banner_html", "book_config", "book_toc",
    "build_book", "check_offline_html", "check_parameters", "load_params", "notebook_names", "notebook_parameters",
    "png_data_uri", "repo_dir", "rerun_commands", "resolve_dataset", "resolve_params_path", "run_command",
    "run_notebooks", "run_study", "shown_path", "show_figure", "show_table", "stage_book_sources", "start",
]
