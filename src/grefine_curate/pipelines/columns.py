"""Output column names, defined once (the output contract of `grefine-curate run`)."""

STATUS = "grefine_status"  # "ok" | "error"
ERROR = "grefine_error"  # message or null
ROUTE = "grefine_route"  # "skip" | "light" | "full" | "reverted" (null on error); score mode: the planned route
ROUTE_PLANNED = "grefine_route_planned"  # score mode: true (the route is planned, nothing was refined)
PQ_SCORE = "pq_score"
AQ_SCORE = "aq_score"
PQ_SCORE_AFTER = "pq_score_after"
AQ_SCORE_AFTER = "aq_score_after"
UNMATCHED = "unmatched_phrases"  # list<string>
SEED = "grefine_seed"
PQ_MAP = "pq_map"  # --save-maps: 64x64 8-bit grey PNG bytes, white = good
AQ_MAP = "aq_map"  # --save-maps: 64x64 8-bit grey PNG bytes, white = needs refinement
ID = "grefine_id"  # score mode / folder input: the item id
PROMPT = "grefine_prompt"  # score mode / folder input: the prompt used
SOURCE = "grefine_source"  # folder input: relative path of the source image
KEY = "key"  # WebDataset input: the sample's key (sidecar Parquet, as img2dataset names it)

STATUS_OK = "ok"
STATUS_ERROR = "error"
ROUTES = ("skip", "light", "full", "reverted")
MAP_SIZE = 64

# Every column the job adds to a row (an input column with one of these names would be overwritten)
ADDED = (STATUS, ERROR, ROUTE, ROUTE_PLANNED, PQ_SCORE, AQ_SCORE, PQ_SCORE_AFTER, AQ_SCORE_AFTER, UNMATCHED, SEED,
         PQ_MAP, AQ_MAP, ID, PROMPT, SOURCE)
