-- Every input column of the rows the greedy kept.
SELECT s.*
FROM src s
ANTI JOIN sem_drop d ON s.uid = d.uid
ORDER BY s.uid
