// Number formats shared by the client page and the dashboard.
export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(2)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}
