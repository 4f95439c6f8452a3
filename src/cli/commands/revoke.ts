import { REVOCATION_REASONS, describeTarget, parseRevocationReason, type RevocationTarget } from '../../authority/revocation.js';
import { HallmarkError } from '../../errors.js';
import { withAuthority } from '../context.js';
import { actor, flag, out, str, type Command } from '../io.js';

export const revokeCommand: Command = {
  name: 'revoke',
  summary: 'revoke a certificate, a device, or every certificate of a batch, a line or a CA',
  usage: `Usage: hallmark revoke (--serial HEX [--ca NAME] | --device UDID | --batch ID | --line NAME | --ca NAME)
                       [--reason REASON] [--json] [--home DIR]

Reasons (RFC 5280): ${Object.keys(REVOCATION_REASONS).join(', ')}; default unspecified.
--device also puts the device in state "revoked": it may not enrol again. --batch, --line and --ca
revoke certificates only: the devices keep their hardware identity and re-enrol (e.g. under a line's
new CA after a compromise). A CA certificate itself is revoked by the offline root.
CRLs and OCSP answers of a running "hallmark serve" change at once.`,
  options: { serial: { type: 'string' }, ca: { type: 'string' }, device: { type: 'string' }, batch: { type: 'string' }, line: { type: 'string' }, reason: { type: 'string' }, json: { type: 'boolean' } },
  async run(args) {
    const serial = str(args, 'serial');
    const ca = str(args, 'ca');
    const chosen = [serial, str(args, 'device'), str(args, 'batch'), str(args, 'line')].filter((v) => v !== undefined).length + (serial === undefined && ca !== undefined ? 1 : 0);
    if (chosen !== 1) throw new HallmarkError('BAD_REQUEST', `name exactly one of --serial, --device, --batch, --line or --ca\n${this.usage}`);
    const target: RevocationTarget = serial !== undefined ? { serial, ca }
      : str(args, 'device') !== undefined ? { device: str(args, 'device')! }
      : str(args, 'batch') !== undefined ? { batch: str(args, 'batch')! }
      : str(args, 'line') !== undefined ? { line: str(args, 'line')! }
      : { ca: ca! };
    const reason = parseRevocationReason(str(args, 'reason'));
    return withAuthority(args, async (authority) => {
      const result = await authority.revoke(target, reason, actor());
      if (flag(args, 'json')) {
        out(JSON.stringify({ target: describeTarget(target), reason, revoked: result.revoked, at: result.at.toISOString(), byIssuer: Object.fromEntries([...result.byIssuer].map(([k, v]) => [k, v.serials])) }, null, 2));
      } else {
        out(`Revoked ${result.revoked} certificate(s) of ${describeTarget(target)} (${reason})`);
        for (const [issuer, e] of result.byIssuer) out(`  ${issuer}: ${e.serials.length <= 10 ? e.serials.join(', ') : `${e.serials.slice(0, 10).join(', ')} … and ${e.serials.length - 10} more`}`);
      }
      return 0;
    });
  },
};
