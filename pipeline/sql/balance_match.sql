-- MetaCLIP substring matching as a token join (see pipeline/match.py for why it is exact).
-- {pool}: a relation with uid, caption. entry_keys(entry_id, entry, n, key): key is the entry
-- itself for one-token entries, its first two tokens joined by a space for longer ones.
WITH spaced AS (
    SELECT uid,
           ' ' || regexp_replace(regexp_replace(coalesce(caption, ''), '([,.;:?!`])', ' \1 ', 'g'),
                                 '[\t\n\r]', ' ', 'g') || ' ' AS s
    FROM {pool}
),
-- tokens 2 .. len-1 of split(s, ' ') lie between the two padding spaces
grams AS (
    SELECT uid, t[i] AS g1, CASE WHEN i + 1 < len(t) THEN t[i] || ' ' || t[i + 1] END AS g2
    FROM (SELECT uid, t, unnest(range(2, len(t))) AS i
          FROM (SELECT uid, string_split(s, ' ') AS t FROM spaced))
),
one_token AS (
    SELECT DISTINCT g.uid, e.entry_id
    FROM grams g JOIN entry_keys e ON e.n = 1 AND g.g1 = e.key
),
candidates AS (
    SELECT DISTINCT g.uid, e.entry_id, e.entry
    FROM grams g JOIN entry_keys e ON e.n > 1 AND g.g2 = e.key
),
multi_token AS (
    -- the candidate's first two tokens occur; the definition itself settles the rest
    SELECT DISTINCT c.uid, c.entry_id
    FROM candidates c JOIN spaced USING (uid)
    WHERE contains(spaced.s, ' ' || c.entry || ' ')
)
SELECT uid, entry_id FROM one_token
UNION ALL
SELECT uid, entry_id FROM multi_token
