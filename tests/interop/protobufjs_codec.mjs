// Encode or decode chat.v1 messages with protobufjs, as a JavaScript client would.
//   node protobufjs_codec.mjs encode chat.v1.ChatMessage < fields.json   -> hex on stdout
// A JSON list encodes each object and concatenates them: the same message with its fields
// in the list's order (protobuf parsers merge concatenated encodings).
//   node protobufjs_codec.mjs decode chat.v1.HistoryPage < hex          -> JSON on stdout
// keepCase keeps the .proto's snake_case names (room, dm_peer, ts_ms) and longs: Number
// gives int64 fields as plain numbers: the JSON the README documents.
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";
import protobuf from "protobufjs";

const [mode, typeName] = process.argv.slice(2);
const protos = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../protos");
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(protos, target);
root.loadSync(["chat/v1/chat.proto", "chat/v1/history.proto"], { keepCase: true });
const type = root.lookupType(typeName);
const input = readFileSync(0, "utf8").trim();

if (mode === "encode") {
  const parsed = JSON.parse(input);
  const parts = (Array.isArray(parsed) ? parsed : [parsed]).map((fields) =>
    Buffer.from(type.encode(type.fromObject(fields)).finish()),
  );
  process.stdout.write(Buffer.concat(parts).toString("hex"));
} else if (mode === "decode") {
  const message = type.decode(Buffer.from(input, "hex"));
  const plain = type.toObject(message, { longs: Number, defaults: true });
  process.stdout.write(JSON.stringify(plain));
} else {
  process.stderr.write("usage: protobufjs_codec.mjs encode|decode TYPE\n");
  process.exit(2);
}
