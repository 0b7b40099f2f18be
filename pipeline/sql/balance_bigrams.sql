-- High-PMI bigrams for the metadata builder. {texts} is a query with one VARCHAR column `text`.
-- Words are split exactly as the matcher splits captions (MetaCLIP spacing, then single
-- spaces), so a bigram "a b" kept here can really occur as " a b " in a spaced caption.
-- Only word-like tokens (letters/digits, inner ' or -) count; punctuation breaks adjacency.
WITH spaced AS (
    SELECT string_split(
        ' ' || regexp_replace(regexp_replace(coalesce(text, ''), '([,.;:?!`])', ' \1 ', 'g'),
                              '[\t\n\r]', ' ', 'g') || ' ', ' ') AS t
    FROM ({texts})
),
pos AS (
    SELECT t[i] AS a, t[i + 1] AS b
    FROM (SELECT t, unnest(range(2, len(t))) AS i FROM spaced)
),
words AS (
    SELECT a, CASE WHEN regexp_full_match(b, '[\p{L}\p{N}]+([''-][\p{L}\p{N}]+)*') THEN b END AS b
    FROM pos
    WHERE regexp_full_match(a, '[\p{L}\p{N}]+([''-][\p{L}\p{N}]+)*')
),
uni AS (SELECT a AS w, count(*) AS c FROM words GROUP BY a),
total AS (SELECT sum(c)::DOUBLE AS n FROM uni),
bi AS (SELECT a, b, count(*) AS c FROM words WHERE b IS NOT NULL GROUP BY a, b
       HAVING count(*) >= $min_count)
SELECT bi.a || ' ' || bi.b AS bigram,
       log2(bi.c * total.n / (ua.c * ub.c)) AS pmi
FROM bi, total
JOIN uni ua ON ua.w = bi.a
JOIN uni ub ON ub.w = bi.b
WHERE log2(bi.c * total.n / (ua.c * ub.c)) >= $min_pmi
ORDER BY pmi DESC, bigram
