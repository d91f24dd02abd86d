// Drives the real npm `mailpit-api` client against the web port:
//   node tests/js/mailpit_client.mjs <port>
// Expects two messages in the server (tests/test_web_mailpit_client.py sends
// them): "Compat plain" and "Compat attachment" (with data.bin attached).
// Prints one JSON object of what it saw; exits 1 on the first failure.
import { MailpitClient } from "mailpit-api";

const port = process.argv[2];
const mailpit = new MailpitClient(`http://127.0.0.1:${port}`);
const seen = {};

try {
  const list = await mailpit.listMessages(0, 10);
  seen.list = { total: list.total, unread: list.unread, subjects: list.messages.map((m) => m.Subject) };

  const found = await mailpit.searchMessages({ query: "subject:attachment" });
  seen.search = found.messages.map((m) => m.Subject);
  const id = found.messages[0].ID;

  const message = await mailpit.getMessageSummary(id);
  seen.message = {
    subject: message.Subject,
    from: message.From.Address,
    text: message.Text.trim(),
    attachments: message.Attachments.map((a) => a.FileName),
  };
  const headers = await mailpit.getMessageHeaders(id);
  seen.headerSubject = headers.Subject;
  const source = await mailpit.getMessageSource(id);
  seen.rawHasSubject = source.includes("Subject: Compat attachment");
  const part = await mailpit.getMessageAttachment(id, message.Attachments[0].PartID);
  seen.part = Buffer.from(await part.arrayBuffer()).toString("latin1");
  seen.latestText = (await mailpit.renderMessageText()).trim();

  // Opening the message marked it read; mark it unread again, then all read.
  seen.unreadAfterOpen = (await mailpit.listMessages()).unread;
  seen.setUnread = await mailpit.setReadStatus({ IDs: [id], Read: false });
  seen.unreadAfterUnmark = (await mailpit.listMessages()).unread;
  await mailpit.setReadStatus({ Read: true });
  seen.unreadAfterAllRead = (await mailpit.listMessages()).unread;

  const waited = await mailpit.waitForMessages({ query: "subject:Compat", count: 2 }, { timeout: 2000 });
  seen.waitedCount = waited.messages_count;

  seen.deleteOne = await mailpit.deleteMessages({ IDs: [id] });
  seen.afterDelete = (await mailpit.listMessages()).messages.map((m) => m.Subject);
  seen.deleteBySearch = await mailpit.deleteMessagesBySearch({ query: "subject:plain" });
  seen.afterSearchDelete = (await mailpit.listMessages()).total;

  try {
    await mailpit.getMessageSummary("no-such-id");
    seen.unknown = "no error";
  } catch (e) {
    seen.unknown = e.message.includes("404") ? "404" : e.message;
  }
  console.log(JSON.stringify(seen));
} catch (e) {
  console.error(e.stack || String(e));
  console.log(JSON.stringify(seen));
  process.exit(1);
}
