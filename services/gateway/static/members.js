// "In this room": the open room's members with their presence. The gateway pages a room's
// member list (`members` frames, online flags included) and pushes `presence` for the
// members of small rooms; in big rooms (the lobby of a big deployment) nothing is pushed,
// so the list is asked again when the room is opened. Built with textContent only.

const PAGE = 200; // the gateway's largest page: one page is what the sidebar shows

export class MemberList {
  constructor({ send, el, avatar, openDm }) {
    this.send = send;
    this.el = el;
    this.avatar = avatar;
    this.openDm = openDm;
    this.me = null;
    this.room = null; // the room shown
    this.members = new Map(); // user -> online (the room shown)
    this.total = 0;
    this.refreshTimer = null;
  }

  // The open thread changed (room name, or null for a DM), or we (re)connected.
  show(room, me) {
    this.me = me;
    if (room !== this.room) {
      this.room = room;
      this.members = new Map();
      this.total = 0;
    }
    this.render();
    if (room) this.send({ type: "members", room, limit: PAGE });
  }

  onMembers(f) {
    if (f.room !== this.room || !Array.isArray(f.members)) return;
    this.members = new Map(f.members.map((m) => [m.user, m.online === true]));
    this.total = typeof f.total === "number" ? f.total : this.members.size;
    this.render();
  }

  onPresence(user, online) {
    if (!this.room) return;
    if (this.members.has(user)) {
      this.members.set(user, online);
      this.render();
    } else if (online) {
      // Someone we did not list: a new member of this room (or of another of ours).
      clearTimeout(this.refreshTimer);
      this.refreshTimer = setTimeout(() => this.show(this.room, this.me), 300);
    }
  }

  render() {
    const ul = document.getElementById("members");
    const section = document.getElementById("members-section");
    if (!ul || !section) return;
    section.hidden = !this.room;
    document.getElementById("members-room").textContent = this.room ? `#${this.room}` : "";
    const users = [...this.members.entries()].sort(
      ([a, aOn], [b, bOn]) => Number(bOn) - Number(aOn) || a.localeCompare(b),
    );
    const online = users.filter(([, on]) => on).length;
    document.getElementById("members-count").textContent =
      this.total > users.length ? `${online} / ${this.total}` : `${online} / ${users.length}`;
    ul.replaceChildren(...users.map(([user, on]) => this.item(user, on)));
  }

  item(user, on) {
    const el = this.el;
    const me = user === this.me;
    const button = el(
      "button",
      {
        type: "button",
        class: "user-button",
        title: me ? "This is you" : `Message ${user}`,
        disabled: me,
        onclick: () => this.openDm(user),
      },
      el("span", { class: `dot ${on ? "on" : "off"}`, "aria-hidden": "true" }),
      this.avatar(user),
      el("span", { class: "user-name", text: user }),
      el("span", { class: "sr-only", text: on ? ", online" : ", offline" }),
    );
    return el("li", { dataset: { user, online: on ? "true" : "false", testid: `member-${user}` } }, button);
  }
}
