import { DEFAULT_EXPIRY_WITHIN, expiryReport } from '../../authority/expiry.js';
import { withStoreOnly } from '../context.js';
import { flag, intOption, out, str, table, type Command } from '../io.js';

export const expiryCommand: Command = {
  name: 'expiry',
  summary: 'valid certificates expiring soon: devices by product / line / batch, other certificates, counts per week',
  usage: `Usage: hallmark expiry [--within DURATION] [--limit N] [--json] [--home DIR]

Lists the valid (unrevoked, unexpired) certificates that expire within DURATION (default ${DEFAULT_EXPIRY_WITHIN};
e.g. 7d, 2w, 90d): device certificates grouped by product, line and batch, then the others
(tls-server, ocsp-signer, operator-issued), then how many expire in each ISO week (Monday, UTC).
--limit caps the certificates listed (default 1000); the counts are always complete.`,
  options: { within: { type: 'string' }, limit: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    return withStoreOnly(args, async (ctx) => {
      const report = await expiryReport(ctx.store, { within: str(args, 'within'), limit: intOption(args, 'limit') });
      if (flag(args, 'json')) {
        out(JSON.stringify(report, null, 2));
        return 0;
      }
      out(`${report.total} valid certificate(s) expire within ${report.within} (by ${report.until}): ${report.devices} device, ${report.others} other`);
      if (report.groups.length > 0) {
        out('\nDevice certificates by product / line / batch:');
        out(table(['PRODUCT', 'LINE', 'BATCH', 'COUNT', 'EARLIEST'], report.groups.map((g) => [g.product, g.line, g.batch, String(g.count), g.earliest])));
        for (const g of report.groups) {
          out(`\n${g.product} / ${g.line} / ${g.batch}:`);
          out(table(['NOT AFTER', 'DAYS', 'SERIAL', 'ISSUER', 'DEVICE', 'SERIAL NUMBER', 'STATE'],
            g.certificates.map((c) => [c.notAfter, String(c.daysLeft), c.serial, c.issuer, c.device, c.serialNumber ?? '-', c.deviceState])));
        }
      }
      if (report.otherCertificates.length > 0) {
        out('\nOther certificates:');
        out(table(['NOT AFTER', 'DAYS', 'PROFILE', 'SERIAL', 'ISSUER', 'SUBJECT'], report.otherCertificates.map((c) => [c.notAfter, String(c.daysLeft), c.profile, c.serial, c.issuer, c.subject])));
      }
      out('\nPer week (Monday, UTC):');
      out(table(['WEEK', 'DEVICES', 'OTHERS', 'TOTAL'], report.weeks.map((w) => [w.week, String(w.devices), String(w.others), String(w.total)])));
      if (report.truncated) out(`\n(listing capped at ${intOption(args, 'limit') ?? 1000} certificates; counts are complete — use --limit)`);
      return 0;
    });
  },
};
