//! Agreement metrics between a gold rater and a predicted one, with their textbook
//! definitions. Pure functions: no I/O, no JSON.
//!
//! A metric that is undefined for its input (no pairs, a chance agreement of 1, a single
//! category) is `None`, never NaN, so that a report can say "n/a" and JSON gets `null`.
//! Sums are kept in integers until the final division, so degenerate cases are detected
//! exactly rather than through float comparisons.

/// Why a confusion matrix could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsError {
    #[error("pair {index}: the {side} value is not one of the categories")]
    NotACategory { index: usize, side: &'static str },
}

/// Accuracy: the fraction of pairs `(gold, predicted)` that agree,
/// `(number of agreeing pairs) / (number of pairs)`; the "observed agreement" `p_o` of
/// Cohen, J. (1960), "A coefficient of agreement for nominal scales", *Educational and
/// Psychological Measurement* 20(1), 37–46.
///
/// `None` when there are no pairs.
pub fn accuracy<T: PartialEq>(pairs: &[(T, T)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let agreed = pairs
        .iter()
        .filter(|(gold, predicted)| gold == predicted)
        .count();
    Some(agreed as f64 / pairs.len() as f64)
}

/// The confusion matrix of `pairs` over `categories`: `matrix[i][j]` counts the pairs
/// whose gold value is `categories[i]` (rows) and whose predicted value is
/// `categories[j]` (columns): the layout of scikit-learn's `confusion_matrix`
/// (`y_true` in rows), the contingency table Cohen (1960) computes kappa from.
///
/// A value outside `categories` is an error rather than silently left out, so that the
/// matrix always accounts for every pair.
pub fn confusion_matrix<T: PartialEq>(
    categories: &[T],
    pairs: &[(T, T)],
) -> Result<Vec<Vec<u64>>, MetricsError> {
    let k = categories.len();
    let mut matrix = vec![vec![0u64; k]; k];
    for (index, (gold, predicted)) in pairs.iter().enumerate() {
        let row = categories
            .iter()
            .position(|c| c == gold)
            .ok_or(MetricsError::NotACategory {
                index,
                side: "gold",
            })?;
        let column =
            categories
                .iter()
                .position(|c| c == predicted)
                .ok_or(MetricsError::NotACategory {
                    index,
                    side: "predicted",
                })?;
        matrix[row][column] += 1;
    }
    Ok(matrix)
}

/// Row sums, column sums and total of a square matrix; `None` if it is not square or empty.
fn marginals(matrix: &[Vec<u64>]) -> Option<(Vec<u128>, Vec<u128>, u128)> {
    let k = matrix.len();
    if matrix.iter().any(|row| row.len() != k) {
        return None;
    }
    let rows: Vec<u128> = matrix
        .iter()
        .map(|row| row.iter().map(|&c| u128::from(c)).sum())
        .collect();
    let columns: Vec<u128> = (0..k)
        .map(|j| matrix.iter().map(|row| u128::from(row[j])).sum())
        .collect();
    let n: u128 = rows.iter().sum();
    (n > 0).then_some((rows, columns, n))
}

/// Cohen's kappa from a confusion matrix (rows gold, columns predicted):
/// `kappa = (p_o - p_e) / (1 - p_e)`, with `p_o = sum_i O_ii / n` the observed agreement
/// and `p_e = sum_i (row_i / n) * (column_i / n)` the agreement expected by chance from the
/// marginals. Cohen, J. (1960), "A coefficient of agreement for nominal scales",
/// *Educational and Psychological Measurement* 20(1), 37–46.
///
/// `None` when the matrix is empty, not square, or `p_e == 1`. `p_e == 1` happens only
/// when both raters put every item in the same one category; kappa is then 0/0.
/// scikit-learn's `cohen_kappa_score` returns NaN there; calling it 1.0 (they agree) or
/// 0.0 (no better than chance) would each claim something the data cannot show, so this
/// says "undefined" in a way the type system makes callers handle.
pub fn cohen_kappa(matrix: &[Vec<u64>]) -> Option<f64> {
    let (rows, columns, n) = marginals(matrix)?;
    let agreed: u128 = (0..matrix.len()).map(|i| u128::from(matrix[i][i])).sum();
    // In units of 1/n²: p_o = agreed·n / n², p_e = chance / n².
    let chance: u128 = rows.iter().zip(&columns).map(|(r, c)| r * c).sum();
    let n2 = n * n;
    if chance == n2 {
        return None;
    }
    let p_o = (agreed * n) as f64 / n2 as f64;
    let p_e = chance as f64 / n2 as f64;
    Some((p_o - p_e) / (1.0 - p_e))
}

/// Quadratic-weighted kappa from a confusion matrix whose categories are in ordinal order
/// (rows gold, columns predicted): with disagreement weights
/// `w_ij = (i - j)² / (k - 1)²`, observed counts `O_ij` and counts expected by chance from
/// the marginals `E_ij = row_i · column_j / n`,
/// `kappa_w = 1 - sum_ij(w_ij · O_ij) / sum_ij(w_ij · E_ij)`.
/// Cohen, J. (1968), "Weighted kappa: Nominal scale agreement with provision for scaled
/// disagreement or partial credit", *Psychological Bulletin* 70(4), 213–220, with the
/// quadratic weights of Fleiss, J. L. & Cohen, J. (1973), *Educational and Psychological
/// Measurement* 33(3), 613–619 (scikit-learn's `cohen_kappa_score(weights="quadratic")`).
///
/// Computed exactly as `1 - n · sum((i-j)² O_ij) / sum((i-j)² row_i column_j)`: the
/// constant `1/(k-1)²` and the `1/n` of `E` cancel in the ratio.
///
/// `None` when the matrix is empty, not square, has one category (`k - 1 = 0`), or the
/// expected weighted disagreement is 0 (both raters used one and the same category for
/// every item: 0/0, as with [`cohen_kappa`]).
pub fn quadratic_weighted_kappa(matrix: &[Vec<u64>]) -> Option<f64> {
    let (rows, columns, n) = marginals(matrix)?;
    let k = matrix.len();
    if k < 2 {
        return None;
    }
    let mut observed: u128 = 0;
    let mut expected: u128 = 0;
    for i in 0..k {
        for j in 0..k {
            let d = i.abs_diff(j) as u128;
            observed += d * d * u128::from(matrix[i][j]);
            expected += d * d * rows[i] * columns[j];
        }
    }
    if expected == 0 {
        return None;
    }
    Some(1.0 - (n * observed) as f64 / expected as f64)
}

/// Mean absolute error: `sum |gold - predicted| / n` over the pairs (e.g. Willmott, C. J.
/// & Matsuura, K. (2005), "Advantages of the mean absolute error (MAE) over the root mean
/// square error (RMSE) in assessing average model performance", *Climate Research* 30,
/// 79–82).
///
/// `None` when there are no pairs.
pub fn mean_absolute_error(pairs: &[(i64, i64)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let total: u128 = pairs
        .iter()
        .map(|&(gold, predicted)| u128::from(gold.abs_diff(predicted)))
        .sum();
    Some(total as f64 / pairs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: Option<f64>, expected: f64) -> bool {
        actual.is_some_and(|a| (a - expected).abs() < 1e-12)
    }

    #[test]
    fn accuracy_counts_agreeing_pairs() {
        // 3 of 4 pairs agree: 3/4 = 0.75.
        let pairs = [(true, true), (false, false), (true, false), (false, false)];
        assert_eq!(accuracy(&pairs), Some(0.75));
        assert_eq!(accuracy::<bool>(&[]), None);
    }

    #[test]
    fn confusion_matrix_has_gold_rows_and_predicted_columns() -> Result<(), MetricsError> {
        let categories = ["a", "b", "c"];
        // gold a → a, a → b, b → b, c → a, c → c, c → c
        let pairs = [
            ("a", "a"),
            ("a", "b"),
            ("b", "b"),
            ("c", "a"),
            ("c", "c"),
            ("c", "c"),
        ];
        assert_eq!(
            confusion_matrix(&categories, &pairs)?,
            vec![vec![1, 1, 0], vec![0, 1, 0], vec![1, 0, 2]]
        );
        assert_eq!(
            confusion_matrix(&categories, &[("a", "a"), ("a", "z")]),
            Err(MetricsError::NotACategory {
                index: 1,
                side: "predicted"
            })
        );
        Ok(())
    }

    #[test]
    fn kappa_of_a_two_by_two_table() {
        // The 2×2 example of Wikipedia's "Cohen's kappa" article:
        //              pred yes  pred no   row sums
        //   gold yes      20        5        25
        //   gold no       10       15        25
        //   col sums      30       20        n = 50
        // p_o = (20 + 15) / 50 = 0.7
        // p_e = (25·30 + 25·20) / 50² = (750 + 500) / 2500 = 0.5
        // kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
        assert!(close(cohen_kappa(&[vec![20, 5], vec![10, 15]]), 0.4));
    }

    #[test]
    fn kappa_of_a_three_by_three_table() {
        // O = [[2,1,0],[0,2,1],[1,0,3]], n = 10; rows (3,3,4), columns (3,3,4).
        // p_o = (2 + 2 + 3) / 10 = 0.7
        // p_e = (3·3 + 3·3 + 4·4) / 100 = 0.34
        // kappa = (0.7 - 0.34) / 0.66 = 0.36 / 0.66 = 6/11
        let o = [vec![2, 1, 0], vec![0, 2, 1], vec![1, 0, 3]];
        assert!(close(cohen_kappa(&o), 6.0 / 11.0));
    }

    #[test]
    fn kappa_is_one_for_perfect_agreement_and_can_be_negative() {
        assert_eq!(cohen_kappa(&[vec![3, 0], vec![0, 2]]), Some(1.0));
        // Always the other answer: p_o = 0, p_e = (2·2 + 2·2) / 16 = 0.5,
        // kappa = (0 - 0.5) / 0.5 = -1.
        assert_eq!(cohen_kappa(&[vec![0, 2], vec![2, 0]]), Some(-1.0));
    }

    #[test]
    fn kappa_is_undefined_without_variation_or_pairs() {
        // Both raters said "a" every time: p_e = 1, 0/0.
        assert_eq!(cohen_kappa(&[vec![5, 0], vec![0, 0]]), None);
        assert_eq!(cohen_kappa(&[vec![5]]), None);
        assert_eq!(cohen_kappa(&[vec![0, 0], vec![0, 0]]), None);
        assert_eq!(cohen_kappa(&[]), None);
        // Not square.
        assert_eq!(cohen_kappa(&[vec![1, 2]]), None);
        // One rater constant, the other not: p_e = (5·3 + 0·2) / 25 = 0.6, p_o = 0.6,
        // kappa = 0: defined, and no better than chance.
        assert_eq!(cohen_kappa(&[vec![3, 2], vec![0, 0]]), Some(0.0));
    }

    #[test]
    fn quadratic_weighted_kappa_of_a_three_category_table() {
        // k = 3, so w_ij = (i - j)² / (3 - 1)² = (i - j)² / 4:
        //   w = [[0,    0.25, 1   ],
        //        [0.25, 0,    0.25],
        //        [1,    0.25, 0   ]]
        // O = [[2,1,0],[0,2,1],[1,0,3]], n = 10; rows r = (3,3,4), columns c = (3,3,4).
        // sum w·O = 0.25·O01 + 1·O02 + 0.25·O10 + 0.25·O12 + 1·O20 + 0.25·O21
        //         = 0.25·1 + 1·0 + 0.25·0 + 0.25·1 + 1·1 + 0.25·0 = 1.5
        // E_ij = r_i·c_j / 10: E01 = 0.9, E02 = 1.2, E10 = 0.9, E12 = 1.2, E20 = 1.2, E21 = 1.2
        // sum w·E = 0.25·0.9 + 1·1.2 + 0.25·0.9 + 0.25·1.2 + 1·1.2 + 0.25·1.2
        //         = 0.225 + 1.2 + 0.225 + 0.3 + 1.2 + 0.3 = 3.45
        // kappa_w = 1 - 1.5 / 3.45 = 1 - 10/23 = 13/23 ≈ 0.5652
        let o = [vec![2, 1, 0], vec![0, 2, 1], vec![1, 0, 3]];
        assert!(close(quadratic_weighted_kappa(&o), 13.0 / 23.0));
    }

    #[test]
    fn quadratic_weighted_kappa_of_two_categories_is_cohens_kappa() {
        // With k = 2 the only weight is w_01 = w_10 = 1: unweighted kappa (0.4 above).
        assert!(close(
            quadratic_weighted_kappa(&[vec![20, 5], vec![10, 15]]),
            0.4
        ));
    }

    #[test]
    fn quadratic_weighted_kappa_degenerate_cases() {
        assert_eq!(
            quadratic_weighted_kappa(&[vec![2, 0, 0], vec![0, 1, 0], vec![0, 0, 4]]),
            Some(1.0)
        );
        // One category: (k - 1)² = 0.
        assert_eq!(quadratic_weighted_kappa(&[vec![4]]), None);
        // Every pair (2, 2): expected weighted disagreement 0.
        assert_eq!(
            quadratic_weighted_kappa(&[vec![0, 0, 0], vec![0, 3, 0], vec![0, 0, 0]]),
            None
        );
        assert_eq!(quadratic_weighted_kappa(&[]), None);
    }

    #[test]
    fn mean_absolute_error_averages_distances() {
        // |5-4| + |3-3| + |1-3| + |2-2| = 1 + 0 + 2 + 0 = 3; 3 / 4 = 0.75.
        assert_eq!(
            mean_absolute_error(&[(5, 4), (3, 3), (1, 3), (2, 2)]),
            Some(0.75)
        );
        assert_eq!(
            mean_absolute_error(&[(i64::MIN, i64::MAX)]),
            Some(u64::MAX as f64)
        );
        assert_eq!(mean_absolute_error(&[]), None);
    }
}
