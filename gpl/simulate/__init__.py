"""Turn MovieLens ratings into the event stream of a recommender funnel whose exposure policy is biased.

Why: GPL exists because a pre-ranker only learns from what a *biased* exposure policy chose to show.
To exercise and to evaluate the pipeline we need that bias (long-tail candidates are recalled but
rarely shown) *and* ground truth for the unexposed candidates, which production never has. Real
MovieLens ratings give that truth; everything else here is a documented, seeded simulation.

What is simulated, exactly (all randomness from one ``numpy.random.Generator(seed)``):

Items
    Every movie of ``movies.csv`` is one :class:`~schemas.events.ItemEvent`: ``item_id`` = movieId,
    ``text`` = ``"<title> | genres: a, b | tags: t1, t2"`` (a section is left out when empty; tags are
    the ``max_tags`` tags applied by the most distinct users, lower-cased), ``category`` = first genre
    ("" for "(no genres listed)"), ``ts`` = the time of the first request (the catalogue exists when
    the stream starts). Items are emitted before every request event.

Requests
    Users are taken in ascending userId order (``users`` = the first N of them). A user's ratings are
    sorted by (timestamp, movieId) and cut into consecutive chunks of ``ratings_per_request``; each
    chunk is one request whose *targets* are the chunk's movies. With ``max_requests_per_user`` a
    heavy user keeps that many chunks, evenly spaced over their timeline (so the whole timeline is
    still covered). Ratings of dropped chunks still count as history and as ground truth.
    ``request_id`` = ``"ml-<userId>-<chunk>"``; ``user_id`` = str(userId).

Recall (one :class:`~schemas.events.RecallEvent` per request, ``candidates`` items)
    The targets are injected (so real feedback exists in every request), then the rest is drawn from
    three routes in the proportions ``mix_popular : mix_genre : mix_random``:

    - ``popular``: items drawn with probability ∝ rating_count ** ``popularity_power``;
      score = log1p(count) / log1p(max count) ("popularity score", in [0, 1]).
    - ``genre``: a genre drawn from the user's positives (rated >= ``positive_threshold``) *before the
      request*, then an item uniformly from that genre (so this route reaches the long tail);
      score = "affinity" = the sum over the item's genres of the user's share of genre mentions among
      those positives (in [0, 1]). A user with no positive yet uses the catalogue's genre shares.
    - ``random``: uniform over the catalogue; score = uniform [0, 1).

    Items the user rated *before* the request (earlier in the sorted timeline) are filtered out (a
    recommender does not re-recommend what was consumed); duplicates keep their first route. An
    injected target borrows a route drawn from the mix (``genre`` only when its affinity is > 0) and
    gets that route's score, so nothing in the event marks it as a target. Candidates are listed by
    descending score (ties by item id). A request gets fewer than ``candidates`` only when the
    catalogue minus the user's history is smaller than that.

Exposure (one :class:`~schemas.events.ExposureEvent` per request, the top ``exposed`` candidates)
    The biased policy ranks the recalled candidates by
    ``exposure_popularity_weight * popularity score + exposure_relevance_weight * affinity
    + exposure_noise * N(0, 1)`` and shows the top E at positions 0..E-1. Popularity dominates, so
    long-tail candidates are rarely shown: that is the selection bias GPL must undo. Exposed items
    are always a subset of the request's recall candidates (no exception in this simulator).
    ``clicked`` = the user rated the item >= ``positive_threshold`` at any time (future included:
    the simulated user clicks now what they will rate highly). A target is therefore clicked when
    shown iff its real rating is >= 4.0.

Time and order
    Recall ``ts`` = the first target's rating timestamp in ms; exposure ``ts`` = recall ts + a delay
    uniform in ``exposure_delay_ms`` (inclusive). ``time_origin_ms`` shifts every time so the first
    request is at that instant (MovieLens spans 1996-2018; a real Kafka's retention would delete
    records that old). Events are emitted in event-time order (ties: request order, recall before
    exposure), except that a ``exposure_first_fraction`` of the exposures, chosen at random, is
    emitted immediately *before* its recall (out of order, as a real stream may deliver them); their
    ``ts`` is unchanged, only the emission position moves.

Ground truth (``Simulation.truth``)
    ``truth[(user_id, item_id)]`` for every (user, candidate) pair of any request whose label is
    known: 1 if the user rated the item >= ``positive_threshold`` anywhere in their history (future
    included), 0 if they rated it lower. A pair that is *absent* has an unknown label (never rated):
    most unexposed candidates are unknown, exactly as in production. Labels do not depend on the
    request, so one dict covers exposed and unexposed candidates alike.

Everything is deterministic given (data, config): same seed, same events, byte for byte.
``Simulation.stats`` summarises a run (requests, unexposed per request, click rate, ...) and
:func:`popularity_bias` measures the exposure bias; ``python -m gpl.simulate OUT.jsonl`` writes a
replayable file (:func:`write_jsonl`, for ``gpl.replay``) and prints both.

Cost: the numpy part is vectorised (chunks of requests); most of the time is building the pydantic
contracts, about 1 µs per candidate (full MovieLens, 200 candidates, 40 requests per user: ~12k
requests in ~4 s on 2 cores).
"""

from gpl.simulate.export import popularity_bias, write_jsonl
from gpl.simulate.funnel import SOURCES, SimConfig, Simulation, simulate
from gpl.simulate.movielens import DEFAULT_PATH, NO_GENRE, MovieLens, load_movielens, positive_sequences

__all__ = [
    "DEFAULT_PATH", "NO_GENRE", "SOURCES", "MovieLens", "SimConfig", "Simulation", "load_movielens",
    "popularity_bias", "positive_sequences", "simulate", "write_jsonl",
]
